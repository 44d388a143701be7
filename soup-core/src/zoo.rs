//! Checked access to a [`ModelStore`]: every model is checked against the first model's layout
//! when it is loaded, and whole-model sums are streamed one model at a time.

use candle_core::Tensor;

use crate::error::{Result, SoupError};
use crate::layout::ParamLayout;
use crate::traits::ModelStore;

pub struct Zoo<'a> {
    pub store: &'a dyn ModelStore,
    /// The layout of model 0, which every other model must have.
    pub layout: ParamLayout,
    pub names: Vec<String>,
}

impl<'a> Zoo<'a> {
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
