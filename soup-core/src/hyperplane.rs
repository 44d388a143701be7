//! The hyperplane parameterisation of spec §3.2–3.4.
//!
//! θ^l = c^l + Σ_i X_{i,l} d_{i,l}, with d_{i,l} = (θ_i^l − c^l)/‖θ_i^l − c^l‖ for the models i of
//! one model batch. If c = Σ_j γ_j θ_j with Σ_j γ_j = 1 (per block), then θ = Σ_j α_j θ_j with
//! α_j = γ_j (1 − s) + [j ∈ B] X_j/‖θ_j − c‖ and s = Σ_{k∈B} X_k/‖θ_k − c‖, so Σ_j α_j = 1.
//!
//! With [`Directions::Difference`] (a deviation from the authors, spec §3.4) d_{i,l} = θ_i^l − c^l
//! is not normalised, so X_{i,l} is itself the change of α: α_j = γ_j (1 − s) + [j ∈ B] X_j,
//! s = Σ_{k∈B} X_k. An optimizer whose step size does not depend on the gradient's scale (Adam)
//! then moves every block's α at the same rate, instead of at 1/‖θ_i^l − c^l‖ times it.
//!
//! Through a base model θ_0 (task vectors, spec §3.9: AdaMerging through MEHL) the directions are
//! the task vectors τ_i = θ_i − θ_0, not normalised, so X_i is the change of task i's λ:
//! θ = c + Σ_i X_i τ_i, α_i = γ_i + X_i, α_0 = γ_0 − Σ_i X_i (still Σ_j α_j = 1). λ may be clamped
//! into a range in the forward pass, as AdaMerging does: the step then uses
//! X'_i = clamp(γ_i + X_i) − γ_i, and ∂F/∂X_i is zero where γ_i + X_i is outside the range.

use std::borrow::Cow;

use candle_core::{DType, Tensor};

use crate::error::{Result, SoupError};
use crate::kernels;
use crate::layout::{from_blocks, to_blocks, Block, ParamLayout};
use crate::result::bytes_of;
use crate::transfer;

/// The affine subspace of one model batch and the free coefficients X on it.
#[derive(Clone, Debug)]
pub struct Hyperplane {
    /// The layout of the models' tensors.
    pub layout: ParamLayout,
    /// The blocks the coefficients are learned per.
    pub blocks: Vec<Block>,
    /// Indices (in the zoo) of the models of this batch, in batch order: row i of X is `members[i]`.
    pub members: Vec<usize>,
    /// c, one vector per block.
    center: Vec<Tensor>,
    /// d, one (b × D_l) matrix per block: row i is d_{i,l}.
    directions: Vec<Tensor>,
    /// ‖θ_i^l − c^l‖, b × L row-major; 0 where the direction is guarded to zero.
    norms: Vec<f64>,
    /// γ[l][j]: the center as an affine combination of all N models, per block.
    gamma: Vec<Vec<f64>>,
    /// X, b × L row-major (X_{i,l} at i·L + l). Zero when the hyperplane is built.
    pub x: Vec<f64>,
    /// Compute θ and the projection with candle ops (the path of every device but the CPU)
    /// even where the fused CPU kernels apply: [`Self::portable`].
    portable: bool,
    /// Directions from a base model (task vectors) instead of from the center.
    base: Option<Base>,
    /// Whether the directions from the center are normalised.
    scaling: Directions,
}

/// How a model soup's directions are scaled (task vectors are never normalised).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Directions {
    /// d = (θ_i − c)/‖θ_i − c‖, per block: the authors' choice. X moves θ by a distance.
    #[default]
    Unit,
    /// d = θ_i − c: X is the change of α, so a block whose models barely differ does not turn
    /// an ordinary X into an extreme α (spec §3.4).
    Difference,
}

/// The base model of a hyperplane of task vectors ([`Hyperplane::new_task_share`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Base {
    /// θ_0's index in the zoo.
    pub index: usize,
    /// The range λ = γ + X is clamped into in the forward pass (AdaMerging: [0, 1]).
    pub clamp: Option<(f64, f64)>,
}

impl Hyperplane {
    /// Builds the hyperplane through `center` (block vectors, with affine coefficients `gamma`
    /// over all models) spanned by the models `members`, loaded one at a time by `load`:
    /// at most one model is resident besides the directions.
    pub fn new(
        layout: ParamLayout,
        blocks: Vec<Block>,
        center: Vec<Tensor>,
        gamma: Vec<Vec<f64>>,
        members: Vec<usize>,
        load: impl FnMut(usize) -> Result<(String, Vec<Tensor>)>,
    ) -> Result<Self> {
        let b = members.len();
        Self::new_share(
            layout,
            blocks,
            center,
            gamma,
            members,
            b,
            None,
            Directions::Unit,
            load,
        )
    }

    /// The share of a hyperplane of `batch_len` models that one process of a run over several
    /// holds (spec §3.7; `mehl::share` picks the members): the rows of `members` only (possibly
    /// none). The zero-norm guard uses
    /// `batch_len`, so every process guards exactly as one process holding the whole batch.
    ///
    /// `direction_dtype` stores the directions in another dtype than the center's (bf16 or f16
    /// beside an f32 center: half the memory and bandwidth); each d_i is normalised in the
    /// center's dtype, then rounded. `None`: the center's dtype. `directions` says whether
    /// they are normalised.
    #[allow(clippy::too_many_arguments)]
    pub fn new_share(
        layout: ParamLayout,
        blocks: Vec<Block>,
        center: Vec<Tensor>,
        gamma: Vec<Vec<f64>>,
        members: Vec<usize>,
        batch_len: usize,
        direction_dtype: Option<DType>,
        directions: Directions,
        load: impl FnMut(usize) -> Result<(String, Vec<Tensor>)>,
    ) -> Result<Self> {
        let origin = Origin {
            center,
            base: None,
            scaling: directions,
        };
        Self::build(
            layout,
            blocks,
            origin,
            gamma,
            members,
            batch_len,
            direction_dtype,
            load,
        )
    }

    /// The share of a hyperplane of task vectors (spec §3.9): through `center` (affine
    /// coefficients `gamma`, which include the base's), spanned by τ_i = θ_i − θ_0 for the
    /// models `members`, with `base_blocks` θ_0 as block vectors and `base` its index and clamp.
    #[allow(clippy::too_many_arguments)]
    pub fn new_task_share(
        layout: ParamLayout,
        blocks: Vec<Block>,
        center: Vec<Tensor>,
        gamma: Vec<Vec<f64>>,
        members: Vec<usize>,
        batch_len: usize,
        direction_dtype: Option<DType>,
        base: Base,
        base_blocks: Vec<Tensor>,
        load: impl FnMut(usize) -> Result<(String, Vec<Tensor>)>,
    ) -> Result<Self> {
        let origin = Origin {
            center,
            base: Some((base, base_blocks)),
            scaling: Directions::Difference,
        };
        Self::build(
            layout,
            blocks,
            origin,
            gamma,
            members,
            batch_len,
            direction_dtype,
            load,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        layout: ParamLayout,
        blocks: Vec<Block>,
        origin: Origin,
        gamma: Vec<Vec<f64>>,
        members: Vec<usize>,
        batch_len: usize,
        direction_dtype: Option<DType>,
        mut load: impl FnMut(usize) -> Result<(String, Vec<Tensor>)>,
    ) -> Result<Self> {
        let Origin {
            center,
            base,
            scaling,
        } = origin;
        let (base, base_blocks) = match base {
            Some((b, blocks)) => (Some(b), Some(blocks)),
            None => (None, None),
        };
        let b = members.len();
        let num_blocks = blocks.len();
        let directions = blocks
            .iter()
            .zip(&center)
            .map(|(blk, c)| {
                Tensor::zeros(
                    (b, blk.numel),
                    direction_dtype.unwrap_or(c.dtype()),
                    c.device(),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut norms = vec![0.0; b * num_blocks];
        // A difference within rounding of the center (a block that is the same in every model of
        // the batch, averaged in floating point) counts as zero: normalising it would turn
        // rounding noise into a unit direction.
        let floor: Vec<f64> = center
            .iter()
            .map(|c| -> Result<f64> {
                let eps = match c.dtype() {
                    DType::F64 => f64::EPSILON,
                    DType::F32 => f32::EPSILON as f64,
                    _ => 1e-3, // f16/bf16: 2^-10 and 2^-7
                };
                Ok((batch_len + 1) as f64 * eps * l2_norm(c)?)
            })
            .collect::<Result<_>>()?;
        for (i, &j) in members.iter().enumerate() {
            let (name, params) = load(j)?;
            for (l, c) in center.iter().enumerate() {
                // From the base for task vectors, else from the center.
                let from = base_blocks.as_ref().map_or(c, |bb| &bb[l]);
                let keep = |norm: f64| norm.is_finite() && norm > floor[l];
                let unit = scaling == Directions::Unit;
                // The CPU kernel writes the row straight from the model's tensors.
                let fused = (c.dtype() == from.dtype())
                    .then(|| {
                        kernels::direction_row(
                            &directions[l],
                            i,
                            &params[blocks[l].tensors.clone()],
                            from,
                            |norm| keep(norm).then_some(if unit { 1.0 / norm } else { 1.0 }),
                        )
                    })
                    .flatten();
                if let Some(norm) = fused {
                    if !norm.is_finite() {
                        return Err(SoupError::NonFiniteModel {
                            model: name,
                            block: blocks[l].name.clone(),
                        });
                    }
                    if keep(norm) {
                        norms[i * num_blocks + l] = norm;
                    }
                    continue;
                }
                let m = &to_blocks(&params, &blocks[l..=l])?[0];
                let diff = (m.to_dtype(c.dtype())? - from.to_dtype(c.dtype())?)?;
                let norm = l2_norm(&diff)?;
                if !norm.is_finite() {
                    return Err(SoupError::NonFiniteModel {
                        model: name,
                        block: blocks[l].name.clone(),
                    });
                }
                // Zero-norm guard (spec §3.4): θ_i^l = c^l leaves a zero direction, never NaN.
                if norm > floor[l] {
                    let scale = if unit { 1.0 / norm } else { 1.0 };
                    let d = diff.affine(scale, 0.0)?;
                    let d = d.to_dtype(directions[l].dtype())?;
                    directions[l].slice_set(&d.unsqueeze(0)?, 0, i)?;
                    norms[i * num_blocks + l] = norm;
                }
            }
        }
        Ok(Self {
            layout,
            blocks,
            members,
            center,
            directions,
            norms,
            gamma,
            x: vec![0.0; b * num_blocks],
            portable: false,
            base,
            scaling,
        })
    }

    /// The base model when the directions are task vectors.
    pub fn base(&self) -> Option<Base> {
        self.base
    }

    /// The X a step uses: X itself, or with clamped task coefficients X'_{i,l} =
    /// clamp(γ_{i,l} + X_{i,l}) − γ_{i,l}.
    pub fn effective_x(&self) -> Cow<'_, [f64]> {
        let Some(Base {
            clamp: Some((lo, hi)),
            ..
        }) = self.base
        else {
            return Cow::Borrowed(&self.x);
        };
        let num_blocks = self.blocks.len();
        let mut out = self.x.clone();
        for (i, &j) in self.members.iter().enumerate() {
            for l in 0..num_blocks {
                let g = self.gamma[l][j];
                let v = &mut out[i * num_blocks + l];
                *v = (g + *v).clamp(lo, hi) - g;
            }
        }
        Cow::Owned(out)
    }

    /// Zeroes the entries of ∂F/∂X (b × L) whose clamped λ is outside its range (torch's clamp
    /// passes the gradient on the closed range).
    fn mask_clamped(&self, grad_x: &mut [f64]) {
        let Some(Base {
            clamp: Some((lo, hi)),
            ..
        }) = self.base
        else {
            return;
        };
        let num_blocks = self.blocks.len();
        for (i, &j) in self.members.iter().enumerate() {
            for l in 0..num_blocks {
                let lambda = self.gamma[l][j] + self.x[i * num_blocks + l];
                if !(lo..=hi).contains(&lambda) {
                    grad_x[i * num_blocks + l] = 0.0;
                }
            }
        }
    }

    /// This hyperplane computing θ and ⟨∇θ, d_i⟩ with candle ops, as on a GPU, even on the CPU
    /// (`yes`), so that the device path is tested where no GPU is: same results up to the
    /// order of floating-point sums.
    pub fn portable(mut self, yes: bool) -> Self {
        self.portable = yes;
        self
    }

    /// b, the number of models of this batch.
    pub fn batch_len(&self) -> usize {
        self.members.len()
    }

    /// L, the number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// X_{i,l}.
    pub fn coefficient(&self, i: usize, l: usize) -> f64 {
        self.x[i * self.blocks.len() + l]
    }

    /// ‖θ_i^l − c^l‖ (0 for a guarded direction: zero, or within rounding of the center).
    pub fn norm(&self, i: usize, l: usize) -> f64 {
        self.norms[i * self.blocks.len() + l]
    }

    /// The center's block vectors.
    pub fn center(&self) -> &[Tensor] {
        &self.center
    }

    /// The (b × D_l) direction matrix of block l, in the dtype it is stored in.
    pub fn directions(&self, l: usize) -> &Tensor {
        &self.directions[l]
    }

    /// θ = c + Σ X d as block vectors.
    pub fn theta_blocks(&self) -> Result<Vec<Tensor>> {
        // The arithmetic of `theta_step` (bit for bit) where the kernel applies.
        let fused: Option<Vec<Tensor>> = (0..self.blocks.len())
            .map(|l| {
                if self.portable {
                    return None;
                }
                let len = self.blocks[l].numel;
                let x = self.column(l);
                kernels::combine(&self.center[l], &self.directions[l], &x, 0..len, &[len])
                    .map(|t| t.detach())
            })
            .collect();
        if let Some(blocks) = fused {
            return Ok(blocks);
        }
        let (deltas, active) = self.delta_blocks()?;
        self.add_center(deltas, &active)
    }

    /// c + `deltas` per block, where `active` (> 0) says a block has any non-zero coefficient;
    /// an inactive block is c itself.
    pub(crate) fn add_center(&self, deltas: Vec<Tensor>, active: &[f64]) -> Result<Vec<Tensor>> {
        self.center
            .iter()
            .zip(deltas)
            .zip(active)
            .map(|((c, d), &a)| Ok(if a > 0.0 { (c + d)? } else { c.clone() }))
            .collect()
    }

    /// Σ_i X_{i,l} d_{i,l} over this hyperplane's rows, per block, and whether any X of the
    /// block is non-zero (1.0) or not (0.0, and the block's sum is zeros): the share of θ − c
    /// of one process of a run over several. X reaches the tensors' device in one transfer
    /// (b × L); each block's sum is one (1 × b)·(b × D_l) product there.
    pub(crate) fn delta_blocks(&self) -> Result<(Vec<Tensor>, Vec<f64>)> {
        let (b, num_blocks) = (self.batch_len(), self.blocks.len());
        let effective = self.effective_x();
        let active: Vec<f64> = (0..num_blocks)
            .map(|l| f64::from(u8::from(self.column(l).iter().any(|&v| v != 0.0))))
            .collect();
        let x = match self.center.first() {
            Some(c) if active.iter().any(|&a| a > 0.0) => Some(transfer::upload(
                &effective,
                (b, num_blocks),
                c.dtype(),
                c.device(),
            )?),
            _ => None,
        };
        let deltas = (0..num_blocks)
            .map(|l| {
                let c = &self.center[l];
                let Some(x) = x.as_ref().filter(|_| active[l] > 0.0) else {
                    return Ok(c.zeros_like()?);
                };
                let xs = x.narrow(1, l, 1)?.t()?.contiguous()?;
                let d = self.directions[l].to_dtype(c.dtype())?;
                Ok(xs.matmul(&d)?.squeeze(0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((deltas, active))
    }

    /// θ as named tensors in layout order.
    pub fn theta(&self) -> Result<Vec<Tensor>> {
        from_blocks(&self.theta_blocks()?, &self.blocks, &self.layout)
    }

    /// θ as named tensors in layout order for a training step: on the CPU each tensor is a
    /// candle variable computed in one pass over c and the directions (autograd takes it without
    /// a copy), written into the variables of `previous` (the θ of the last step of this
    /// hyperplane, no longer needed: no allocation, no page faults) when they fit; elsewhere
    /// [`Self::theta`]. Anything else holding `previous` sees its values change.
    pub fn theta_step(&self, previous: Option<Vec<Tensor>>) -> Result<Vec<Tensor>> {
        let pieces = self.tensor_pieces();
        let columns: Vec<Vec<f64>> = (0..self.blocks.len()).map(|l| self.column(l)).collect();
        if self.portable {
            return self.theta();
        }
        if let Some(previous) = previous {
            let fits = previous.len() == pieces.len()
                && previous.iter().zip(&pieces).all(|(t, (_, _, shape))| {
                    t.is_variable() && t.is_contiguous() && t.dims() == *shape
                });
            let written = fits
                && previous.iter().zip(&pieces).all(|(dst, (l, range, _))| {
                    let (c, d) = (&self.center[*l], &self.directions[*l]);
                    kernels::combine_into(dst, c, d, &columns[*l], range.clone()).is_some()
                });
            if written {
                return Ok(previous);
            }
        }
        let fused: Option<Vec<Tensor>> = pieces
            .into_iter()
            .map(|(l, range, shape)| {
                kernels::combine(
                    &self.center[l],
                    &self.directions[l],
                    &columns[l],
                    range,
                    shape,
                )
            })
            .collect();
        match fused {
            Some(out) => Ok(out),
            None => self.theta(),
        }
    }

    /// Column l of the X a step uses ([`Self::effective_x`]) for every row i.
    fn column(&self, l: usize) -> Vec<f64> {
        let num_blocks = self.blocks.len();
        let x = self.effective_x();
        (0..self.batch_len())
            .map(|i| x[i * num_blocks + l])
            .collect()
    }

    /// Every tensor of the layout, in order, as (its block, its element range in the block
    /// vector, its shape).
    fn tensor_pieces(&self) -> Vec<(usize, std::ops::Range<usize>, &[usize])> {
        let mut out = Vec::with_capacity(self.layout.len());
        for (l, blk) in self.blocks.iter().enumerate() {
            let mut offset = 0;
            for spec in &self.layout.tensors[blk.tensors.clone()] {
                out.push((l, offset..offset + spec.numel(), spec.shape.as_slice()));
                offset += spec.numel();
            }
        }
        out
    }

    /// The gradient with respect to X of a loss whose ∇θ is `grad` (named tensors in layout
    /// order): ∂F/∂X_{i,l} = ⟨g^l, d_{i,l}⟩, one (b × D_l)·(D_l × 1) product per block.
    /// Returned b × L row-major, like `x`.
    pub fn project(&self, grad: &[Tensor]) -> Result<Vec<f64>> {
        if self.members.is_empty() {
            return Ok(Vec::new());
        }
        if let Some((out, _)) = self.project_fused(grad) {
            return Ok(out);
        }
        let g = to_blocks(grad, &self.blocks)?;
        let cols = g
            .iter()
            .zip(&self.directions)
            .map(|(g, d)| {
                // Half-precision directions are widened to the gradient's dtype.
                let d = match d.dtype() {
                    DType::BF16 | DType::F16 => d.to_dtype(g.dtype())?,
                    _ => d.clone(),
                };
                d.matmul(&g.to_dtype(d.dtype())?.unsqueeze(1)?)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // b × L, back to the host in one transfer.
        let mut out = transfer::to_vec(&Tensor::cat(&cols, 1)?)?;
        self.mask_clamped(&mut out);
        Ok(out)
    }

    /// [`Self::project`] and the global norm ‖∇θ‖ of `grad` (every tensor), on the CPU from one
    /// pass over ∇θ: each chunk's Σ g² is taken while the chunk is in cache for the projection,
    /// in `optim::global_norm`'s order, so the norm has its exact bits. Elsewhere, or when the
    /// blocks do not cover the layout's tensors in order, the two are computed apart.
    pub fn project_and_norm(&self, grad: &[Tensor]) -> Result<(Vec<f64>, f64)> {
        let covers = self
            .blocks
            .iter()
            .map(|b| b.tensors.clone())
            .try_fold(0, |next, r| (r.start == next).then_some(r.end))
            == Some(grad.len());
        if covers && !self.members.is_empty() {
            if let Some((out, squares)) = self.project_fused(grad) {
                let norm = squares.iter().fold(0.0, |a, s| a + s).sqrt();
                return Ok((out, norm));
            }
        }
        let norm = match self.portable {
            true => crate::optim::global_norm_portable(grad)?,
            false => crate::optim::global_norm(grad)?,
        };
        Ok((self.project(grad)?, norm))
    }

    /// The fused CPU projection: one pass over each block's directions, reading the block's
    /// gradient tensors where they are; with each tensor's Σ g² in layout order (blocks in
    /// order). `None` when portable or off the CPU.
    fn project_fused(&self, grad: &[Tensor]) -> Option<(Vec<f64>, Vec<f64>)> {
        if self.portable {
            return None;
        }
        let b = self.batch_len();
        let num_blocks = self.blocks.len();
        let parts: Vec<(Vec<f64>, Vec<f64>)> = self
            .blocks
            .iter()
            .zip(&self.directions)
            .map(|(block, d)| kernels::dots_pieces_and_squares(d, &grad[block.tensors.clone()]))
            .collect::<Option<_>>()?;
        let mut out = vec![0.0; b * num_blocks];
        let mut squares = Vec::with_capacity(grad.len());
        for (l, (col, sq)) in parts.into_iter().enumerate() {
            for (i, v) in col.iter().enumerate() {
                out[i * num_blocks + l] = *v;
            }
            squares.extend(sq);
        }
        self.mask_clamped(&mut out);
        Some((out, squares))
    }

    /// α[l][j] for all N models, per block (spec §3.2).
    pub fn alpha(&self) -> Vec<Vec<f64>> {
        let (s, own) = self.alpha_terms();
        self.alpha_from_terms(&s, &own)
    }

    /// The terms of α that this hyperplane's rows contribute: s_l = Σ_i X_{i,l}/‖θ_i^l − c^l‖
    /// and own[l][j] = X_{j,l}/‖θ_j^l − c^l‖ for its members j (0 elsewhere); for difference
    /// directions X_{j,l} itself, and for task vectors the step's X'_{j,l}. Over several
    /// processes, the sums of both over the processes give α by [`Self::alpha_from_terms`].
    pub fn alpha_terms(&self) -> (Vec<f64>, Vec<Vec<f64>>) {
        let num_blocks = self.blocks.len();
        let n = self.gamma.first().map_or(0, Vec::len);
        let x = self.effective_x();
        let mut s = vec![0.0; num_blocks];
        let mut own = vec![vec![0.0; n]; num_blocks];
        for l in 0..num_blocks {
            for (i, &j) in self.members.iter().enumerate() {
                let norm = self.norms[i * num_blocks + l];
                let v = match (norm > 0.0, self.scaling) {
                    (false, _) => 0.0,
                    (true, Directions::Difference) => x[i * num_blocks + l],
                    (true, Directions::Unit) => x[i * num_blocks + l] / norm,
                };
                s[l] += v;
                own[l][j] += v;
            }
        }
        (s, own)
    }

    /// α[l][j] = γ[l][j](1 − s_l) + own[l][j]; for task vectors α[l][j] = γ[l][j] + own[l][j]
    /// − [j = base] s_l.
    pub fn alpha_from_terms(&self, s: &[f64], own: &[Vec<f64>]) -> Vec<Vec<f64>> {
        self.gamma
            .iter()
            .zip(s)
            .zip(own)
            .map(|((gamma, s), own)| {
                gamma
                    .iter()
                    .zip(own)
                    .enumerate()
                    .map(|(j, (g, o))| match self.base {
                        Some(b) if b.index == j => g + o - s,
                        Some(_) => g + o,
                        None => g * (1.0 - s) + o,
                    })
                    .collect()
            })
            .collect()
    }

    /// Bytes of the directions.
    pub fn direction_bytes(&self) -> usize {
        bytes_of(&self.directions)
    }

    /// Bytes of the center.
    pub fn center_bytes(&self) -> usize {
        bytes_of(&self.center)
    }

    /// Bytes of X, its norms and the α bookkeeping.
    pub fn coefficient_bytes(&self) -> usize {
        let n = self.gamma.first().map_or(0, Vec::len);
        (self.x.len() + self.norms.len() + self.gamma.len() * n) * std::mem::size_of::<f64>()
    }
}

/// Where a hyperplane's directions start: the center, or a base model (its index and clamp,
/// and its block vectors); and whether they are normalised.
struct Origin {
    center: Vec<Tensor>,
    base: Option<(Base, Vec<Tensor>)>,
    scaling: Directions,
}

/// ‖t‖₂, accumulated in f64.
fn l2_norm(t: &Tensor) -> Result<f64> {
    Ok(transfer::scalar(&t.sqr()?.sum_all()?)?.sqrt())
}
