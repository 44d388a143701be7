//! Checked access to a [`ModelStore`]: every model is checked against the first model's layout
//! when it is loaded, and whole-model sums are streamed one model at a time.

use candle_core::{DType, Tensor};

use crate::error::{Result, SoupError};
use crate::kernels;
use crate::layout::{Block, ParamLayout};
use crate::traits::{Collective, ModelStore};
use crate::transfer;

/// A model store whose every model is checked against the first's layout as it is loaded, with sums and combinations over the zoo streamed one model at a time.
pub struct Zoo<'a> {
    /// Where the models come from.
    pub store: &'a dyn ModelStore,
    /// The layout of model 0, which every other model must have.
    pub layout: ParamLayout,
    /// The models' names.
    pub names: Vec<String>,
}

impl<'a> Zoo<'a> {
    /// The zoo of `store`: reads the first model's layout; errors when the store is empty.
    pub fn open(store: &'a dyn ModelStore) -> Result<Self> {
        if store.is_empty() {
            return Err(SoupError::EmptyZoo);
        }
        let layout = store.layout(0)?;
        if layout.is_empty() || layout.numel() == 0 {
            return Err(SoupError::EmptyLayout);
        }
        let names = (0..store.len()).map(|i| store.name(i)).collect();
        Ok(Self {
            store,
            layout,
            names,
        })
    }

    /// N.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the zoo holds no model.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Loads model `i` after checking its layout, and checks what was loaded.
    pub fn load(&self, i: usize) -> Result<(String, Vec<Tensor>)> {
        let name = &self.names[i];
        self.layout.check_same(name, &self.store.layout(i)?)?;
        let tensors = self.store.load(i)?;
        self.layout.check_tensors(name, &tensors)?;
        Ok((name.clone(), tensors))
    }

    /// Σ_{j ∈ members} θ_j, named tensors, holding one model besides the running sum. Every model
    /// is converted to the dtype of the first.
    pub fn sum(&self, members: &[usize]) -> Result<Vec<Tensor>> {
        let mut sum: Option<Vec<Tensor>> = None;
        for &j in members {
            let (_, model) = self.load(j)?;
            sum = Some(match sum {
                None => model,
                Some(s) => s
                    .iter()
                    .zip(&model)
                    .map(|(a, m)| a + m.to_dtype(a.dtype())?)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        sum.ok_or(SoupError::EmptyZoo)
    }

    /// Σ θ_j over the models of every process of `comm`, each process summing `mine` (possibly
    /// none). The processes first agree on the dtype of the sum (the widest of their models'),
    /// so one without models contributes zeros of the right type.
    pub fn sum_over(&self, mine: &[usize], comm: &dyn Collective) -> Result<Vec<Tensor>> {
        if comm.world_size() == 1 {
            return self.sum(mine);
        }
        const DTYPES: [DType; 4] = [DType::F16, DType::BF16, DType::F32, DType::F64];
        let part = if mine.is_empty() {
            None
        } else {
            Some(self.sum(mine)?)
        };
        let mut seen = [0.0; DTYPES.len()];
        if let Some(p) = &part {
            let dtype = p.first().ok_or(SoupError::EmptyLayout)?.dtype();
            if let Some(k) = DTYPES.iter().position(|&d| d == dtype) {
                seen[k] = 1.0;
            }
        }
        let seen = comm.all_reduce_f64(&seen)?;
        let dtype = DTYPES
            .iter()
            .zip(&seen)
            .rev()
            .find(|(_, &n)| n > 0.0)
            .map_or(DType::F32, |(&d, _)| d);
        let device = self.store.device();
        let part = match part {
            Some(p) => p
                .iter()
                .map(|t| t.to_dtype(dtype))
                .collect::<candle_core::Result<Vec<_>>>()?,
            None => self
                .layout
                .tensors
                .iter()
                .map(|t| Tensor::zeros(t.shape.as_slice(), dtype, &device))
                .collect::<candle_core::Result<Vec<_>>>()?,
        };
        comm.all_reduce_sum_each(&part)
    }

    /// Σ_j α[l][j] θ_j^l for every block l, summed in f64 over the models `mine` of every
    /// process of `comm` (each process passes its share, possibly none), as block vectors of
    /// `dtype`: the soup of coefficients α, exactly as far as `dtype` allows, holding one model
    /// besides the f64 sums.
    pub fn combination(
        &self,
        alpha: &[Vec<f64>],
        blocks: &[Block],
        mine: &[usize],
        dtype: DType,
        comm: &dyn Collective,
    ) -> Result<Vec<Tensor>> {
        let mut sums: Vec<Vec<f64>> = blocks.iter().map(|b| vec![0.0; b.numel]).collect();
        for &j in mine {
            let (_, model) = self.load(j)?;
            for (l, blk) in blocks.iter().enumerate() {
                let w = alpha[l][j];
                if w == 0.0 {
                    continue;
                }
                let mut offset = 0;
                for t in &model[blk.tensors.clone()] {
                    let n = t.elem_count();
                    let acc = &mut sums[l][offset..offset + n];
                    if kernels::add_scaled(acc, w, t).is_none() {
                        let v = transfer::to_vec(t)?;
                        acc.iter_mut().zip(v).for_each(|(a, v)| *a += w * v);
                    }
                    offset += n;
                }
            }
        }
        let device = self.store.device();
        let mut out = sums
            .into_iter()
            .map(|v| {
                let n = v.len();
                transfer::upload_vec(v, n, &device)
            })
            .collect::<Result<Vec<_>>>()?;
        if comm.world_size() > 1 {
            out = comm.all_reduce_sum_each(&out)?;
        }
        Ok(out
            .iter()
            .map(|t| t.to_dtype(dtype))
            .collect::<candle_core::Result<_>>()?)
    }

    /// The uniform mean of `members`, streamed as in [`Self::sum`].
    pub fn mean(&self, members: &[usize]) -> Result<Vec<Tensor>> {
        scale(&self.sum(members)?, 1.0 / members.len() as f64)
    }
}

/// `tensors` multiplied by `factor`.
pub fn scale(tensors: &[Tensor], factor: f64) -> Result<Vec<Tensor>> {
    Ok(tensors
        .iter()
        .map(|t| t.affine(factor, 0.0))
        .collect::<candle_core::Result<_>>()?)
}
