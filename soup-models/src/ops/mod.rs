//! Differentiable building blocks. candle's fused `layer_norm` and `softmax_last_dim` have no
//! backward and silently cut the graph (docs/STACK.md). On the CPU in f32/f64 these run the
//! fused kernels of `cpu` (hand-written backward passes); elsewhere, and as the
//! references the kernels are tested against, the `reference` versions composed from candle ops
//! that have a backward.

use candle_core::{Result, Tensor, D};

pub mod cpu;

use cpu as kernels;

/// LayerNorm over the last dimension: (x − mean) / √(var + eps) · weight + bias.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels::supported(x) {
        return kernels::layer_norm(x, weight, bias, eps);
    }
    reference::layer_norm(x, weight, bias, eps)
}

/// CLIP's activation: x · σ(1.702 x).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if kernels::supported(x) {
        return kernels::quick_gelu(x);
    }
    reference::quick_gelu(x)
}

/// The exact GELU x·Φ(x) (DINOv2's activation; PyTorch's `nn.GELU()`).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if kernels::supported(x) {
        return kernels::gelu(x);
    }
    reference::gelu(x)
}

/// x Wᵀ + b for x of any rank ≥ 2 (flattened to a 2-D product).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if !kernels::supported(x) {
        return reference::linear(x, weight, bias);
    }
    let dims = x.dims().to_vec();
    let (last, lead) = dims.split_last().expect("linear on a tensor of rank ≥ 1");
    let rows: usize = lead.iter().product();
    let y = kernels::linear(&x.reshape((rows, *last))?, weight, bias)?;
    let mut out = lead.to_vec();
    out.push(weight.dim(0)?);
    y.reshape(out)
}

/// Multi-head self-attention: `qkv` (n, t, 3e) holds the query, key and value projections side by
/// side; returns softmax(scale · Q_h K_hᵀ) V_h for every head h, heads side by side (n, t, e).
pub fn attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if kernels::supported(qkv) {
        return kernels::attention(qkv, heads, scale);
    }
    reference::attention(qkv, heads, scale)
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    reference::softmax(x)
}

/// log-softmax over the last dimension.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Mean cross-entropy of `logits` (n × K) against integer `labels`, with label smoothing ε as
/// in PyTorch: the target is (1 − ε)·onehot + ε/K.
pub fn cross_entropy(logits: &Tensor, labels: &[u32], label_smoothing: f64) -> Result<Tensor> {
    let (n, k) = logits.dims2()?;
    let off = label_smoothing / k as f64;
    let mut target = vec![off; n * k];
    for (i, &y) in labels.iter().enumerate() {
        target[i * k + y as usize] += 1.0 - label_smoothing;
    }
    let target = Tensor::from_vec(target, (n, k), logits.device())?.to_dtype(logits.dtype())?;
    (log_softmax(logits)? * target)?
        .sum_all()?
        .affine(-1.0 / n as f64, 0.0)
}

/// The same operations composed from candle ops that have a backward: what runs off the CPU,
/// and the references of the fused kernels' tests.
pub mod reference {
    use candle_core::{Result, Tensor, D};

    /// LayerNorm over the last dimension: (x − mean) / √(var + eps) · weight + bias.
    pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
        normed.broadcast_mul(weight)?.broadcast_add(bias)
    }

    /// Softmax over the last dimension (the max is subtracted as a constant, which leaves the value
    /// and the gradient unchanged).
    pub fn softmax(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    /// CLIP's activation: x · σ(1.702 x).
    pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
        x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
    }

    /// The exact GELU ½x(1 + erf(x/√2)) from `erf`, whose backward is exact (candle's
    /// `gelu_erf` backward uses 1/√(2π) ≈ 0.398942: relative errors up to 1e-6).
    pub fn gelu(x: &Tensor) -> Result<Tensor> {
        ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?.mul(x)? * 0.5
    }

    /// x Wᵀ + b for x of any rank ≥ 2 (flattened to a 2-D product, the fast path of the matmul).
    pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (last, lead) = dims.split_last().expect("linear on a tensor of rank ≥ 1");
        let rows: usize = lead.iter().product();
        let y = x.reshape((rows, *last))?.matmul(&weight.t()?)?;
        let y = match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = lead.to_vec();
        out.push(weight.dim(0)?);
        y.reshape(out)
    }

    /// Multi-head self-attention from composed ops (see [`super::attention`]).
    pub fn attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
        let (n, t, e3) = qkv.dims3()?;
        let e = e3 / 3;
        let head_dim = e / heads;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * e, e)?
                .reshape((n, t, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let attn = softmax(&(q.matmul(&k.t()?)? * scale)?)?;
        attn.matmul(&v)?.transpose(1, 2)?.reshape((n, t, e))
    }
}
