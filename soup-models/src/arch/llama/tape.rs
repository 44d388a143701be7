//! `llama`'s hand-written pass on slices ([`tape::Tape`]): the decoder layers forward, keeping
//! what their backward needs, and a backward that writes every parameter's gradient once. The
//! vocabulary-sized head is fused with the next-token loss (`ops::cpu::vocab`): its logits are
//! never held whole. [`Llama::forward`](super::Llama) (candle ops and autograd) is the reference
//! this is tested against (`tests/llama.rs`).

use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use soup_core::ParamLayout;

use super::{Llama, FAMILY};
use crate::arch::tape::{self, take, with_slices, Gradients, Target};
use crate::error::{ModelError, Result};
use crate::ops::cpu::slices::{
    causal_attention_backward_into, causal_attention_into, linear_backward_into, linear_into,
    next_token_loss_into, rms_norm_backward_into, rms_norm_into, swiglu_backward_into, swiglu_into,
    CausalDims, Rotary, BLOCK,
};
use crate::ops::cpu::Real;

/// A projection's weight and bias positions in the layout.
type Proj = (usize, Option<usize>);

/// Positions in the layout of one decoder layer's tensors.
struct LayerIndex {
    ln1: usize,
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    ln2: usize,
    gate: Proj,
    up: Proj,
    down: Proj,
}

impl LayerIndex {
    /// q, k and v with their output widths.
    fn qkv(&self, qw: usize, kw: usize) -> [(Proj, usize); 3] {
        [(self.q, qw), (self.k, kw), (self.v, kw)]
    }
}

/// Positions of every tensor the pass reads; `head` is `embed` when the head is tied.
struct DecoderIndex {
    embed: usize,
    layers: Vec<LayerIndex>,
    norm: usize,
    head: usize,
}

impl DecoderIndex {
    fn new(arch: &Llama) -> Self {
        let at = |name: &str| arch.index[name];
        let proj = |name: String| {
            let bias = arch.index.get(&format!("{name}.bias")).copied();
            (at(&format!("{name}.weight")), bias)
        };
        let layers = (0..arch.config.num_hidden_layers)
            .map(|i| {
                let l = format!("model.layers.{i}");
                LayerIndex {
                    ln1: at(&format!("{l}.input_layernorm.weight")),
                    q: proj(format!("{l}.self_attn.q_proj")),
                    k: proj(format!("{l}.self_attn.k_proj")),
                    v: proj(format!("{l}.self_attn.v_proj")),
                    o: proj(format!("{l}.self_attn.o_proj")),
                    ln2: at(&format!("{l}.post_attention_layernorm.weight")),
                    gate: proj(format!("{l}.mlp.gate_proj")),
                    up: proj(format!("{l}.mlp.up_proj")),
                    down: proj(format!("{l}.mlp.down_proj")),
                }
            })
            .collect();
        Self {
            embed: at("model.embed_tokens.weight"),
            layers,
            norm: at("model.norm.weight"),
            head: at(arch.head_name()),
        }
    }
}

/// The sizes of one pass: n sequences of t tokens, width e, MLP width f, vocabulary, RMSNorm's ε,
/// and the attention's.
#[derive(Clone, Copy)]
struct Shape {
    n: usize,
    t: usize,
    e: usize,
    f: usize,
    vocab: usize,
    eps: f64,
    attn: CausalDims,
}

impl Shape {
    fn rows(&self) -> usize {
        self.n * self.t
    }
    /// Query width (heads · d) and key/value width (kv heads · d).
    fn widths(&self) -> (usize, usize) {
        (
            self.attn.heads * self.attn.d,
            self.attn.kv_heads * self.attn.d,
        )
    }
}

/// What one layer keeps: its input x, a = RMSNorm₁(x), q|k|v (q and k rotated), the attention
/// output o, x1 = x + o Woᵀ, m = RMSNorm₂(x1), gate|up and the gated s = silu(gate) ⊙ up.
struct LayerActs<T> {
    x: Vec<T>,
    a: Vec<T>,
    qkv: Vec<T>,
    o: Vec<T>,
    x1: Vec<T>,
    m: Vec<T>,
    gu: Vec<T>,
    s: Vec<T>,
}

fn bias<'a, T>(p: &[&'a [T]], (_, b): Proj) -> Option<&'a [T]> {
    b.map(|b| p[b])
}

fn layer_forward<T: Real>(
    p: &[&[T]],
    l: &LayerIndex,
    s: &Shape,
    rot: &Rotary<T>,
    x: Vec<T>,
) -> (LayerActs<T>, Vec<T>) {
    let (rows, e, f) = (s.rows(), s.e, s.f);
    let (qw, kw) = s.widths();
    let w = s.attn.width();
    let mut a = vec![T::zero(); rows * e];
    rms_norm_into(&x, p[l.ln1], s.eps, &mut a);
    let mut qkv = vec![T::zero(); rows * w];
    Stacked::new(p, &l.qkv(qw, kw), e).forward(&a, rows, &mut qkv);
    // The query heads and the key heads sit side by side from column 0.
    let heads = s.attn.heads + s.attn.kv_heads;
    rot.apply(&mut qkv, (s.t, w, heads), false);
    let mut o = vec![T::zero(); rows * qw];
    causal_attention_into(&qkv, s.attn, &mut o);
    let mut x1 = x.clone();
    linear_into(
        &o,
        p[l.o.0],
        bias(p, l.o),
        true,
        (rows, qw, e),
        (&mut x1, e),
    );
    let mut m = vec![T::zero(); rows * e];
    rms_norm_into(&x1, p[l.ln2], s.eps, &mut m);
    let mut gu = vec![T::zero(); rows * 2 * f];
    Stacked::new(p, &[(l.gate, f), (l.up, f)], e).forward(&m, rows, &mut gu);
    let mut sw = vec![T::zero(); rows * f];
    swiglu_into(&gu, f, &mut sw);
    let mut x2 = x1.clone();
    linear_into(
        &sw,
        p[l.down.0],
        bias(p, l.down),
        true,
        (rows, f, e),
        (&mut x2, e),
    );
    let acts = LayerActs {
        x,
        a,
        qkv,
        o,
        x1,
        m,
        gu,
        s: sw,
    };
    (acts, x2)
}

/// A projection's backward: dW (and db) into their slices of `g`, dx written or added.
fn proj_backward<T: Real>(
    p: &[&[T]],
    g: &mut [&mut [T]],
    proj: Proj,
    x: &[T],
    (dy, dy_rs): (&[T], usize),
    dims: (usize, usize, usize),
    dx: (&mut [T], bool),
) {
    let dw = take(g, proj.0);
    let db = proj.1.map(|b| take(g, b));
    linear_backward_into(x, p[proj.0], (dy, dy_rs), dims, Some(dx), dw, db);
}

/// Projections of one input computed as one product: their weights stacked (Σ out × in) and
/// their biases (zeros where a projection has none), copied from the parameters for each pass
/// (a few MB a layer), because one product of the stacked width runs faster than one per part.
struct Stacked<T> {
    w: Vec<T>,
    b: Option<Vec<T>>,
    /// Each projection with its output width.
    parts: Vec<(Proj, usize)>,
    inp: usize,
}

impl<T: Real> Stacked<T> {
    fn new(p: &[&[T]], parts: &[(Proj, usize)], inp: usize) -> Self {
        let w = parts
            .iter()
            .flat_map(|&((wi, _), _)| p[wi].iter().copied())
            .collect();
        let b = parts.iter().any(|&((_, b), _)| b.is_some()).then(|| {
            parts
                .iter()
                .flat_map(|&((_, b), out)| match b {
                    Some(b) => p[b].to_vec(),
                    None => vec![T::zero(); out],
                })
                .collect()
        });
        Self {
            w,
            b,
            parts: parts.to_vec(),
            inp,
        }
    }

    fn width(&self) -> usize {
        self.parts.iter().map(|&(_, out)| out).sum()
    }

    /// y (rows × Σ out) = x Wᵀ + b.
    fn forward(&self, x: &[T], rows: usize, y: &mut [T]) {
        let out = self.width();
        let dims = (rows, self.inp, out);
        linear_into(x, &self.w, self.b.as_deref(), false, dims, (y, out));
    }

    /// dx (written, or added when its flag is true) and every part's dW and db (into their
    /// slices of `g`) for dy (rows × Σ out).
    fn backward(&self, g: &mut [&mut [T]], x: &[T], dy: &[T], rows: usize, dx: (&mut [T], bool)) {
        let out = self.width();
        let mut dw = vec![T::zero(); out * self.inp];
        let mut db = vec![T::zero(); if self.b.is_some() { out } else { 0 }];
        let db_arg = self.b.as_ref().map(|_| db.as_mut_slice());
        let dims = (rows, self.inp, out);
        linear_backward_into(x, &self.w, (dy, out), dims, Some(dx), &mut dw, db_arg);
        let mut row = 0;
        for &((wi, bi), width) in &self.parts {
            take(g, wi).copy_from_slice(&dw[row * self.inp..(row + width) * self.inp]);
            if let Some(bi) = bi {
                take(g, bi).copy_from_slice(&db[row..row + width]);
            }
            row += width;
        }
    }
}

/// The layer's backward: `dx` holds the gradient of its output and leaves with that of its
/// input; every tensor's gradient is written into its slice of `g` (each taken once).
fn layer_backward<T: Real>(
    p: &[&[T]],
    g: &mut [&mut [T]],
    l: &LayerIndex,
    s: &Shape,
    rot: &Rotary<T>,
    acts: &LayerActs<T>,
    dx: &mut [T],
) {
    let (rows, e, f) = (s.rows(), s.e, s.f);
    let (qw, kw) = s.widths();
    let w = s.attn.width();
    let mut ds = vec![T::zero(); rows * f];
    proj_backward(
        p,
        g,
        l.down,
        &acts.s,
        (dx, e),
        (rows, f, e),
        (&mut ds, false),
    );
    let mut dgu = vec![T::zero(); rows * 2 * f];
    swiglu_backward_into(&acts.gu, &ds, f, &mut dgu);
    drop(ds);
    let mut dm = vec![T::zero(); rows * e];
    let gate_up = Stacked::new(p, &[(l.gate, f), (l.up, f)], e);
    gate_up.backward(g, &acts.m, &dgu, rows, (&mut dm, false));
    drop(dgu);
    // dx1 = dx2 + the MLP branch's input gradient through RMSNorm₂.
    rms_norm_backward_into(&acts.x1, p[l.ln2], &dm, s.eps, (dx, true), take(g, l.ln2));
    let mut d_o = vec![T::zero(); rows * qw];
    proj_backward(
        p,
        g,
        l.o,
        &acts.o,
        (dx, e),
        (rows, qw, e),
        (&mut d_o, false),
    );
    let mut dqkv = vec![T::zero(); rows * w];
    causal_attention_backward_into(&acts.qkv, &d_o, s.attn, &mut dqkv);
    drop(d_o);
    rot.apply(&mut dqkv, (s.t, w, s.attn.heads + s.attn.kv_heads), true);
    let da = &mut dm;
    let qkv = Stacked::new(p, &l.qkv(qw, kw), e);
    qkv.backward(g, &acts.a, &dqkv, rows, (&mut da[..], false));
    // dx = dx1 + the attention branch's input gradient through RMSNorm₁.
    rms_norm_backward_into(&acts.x, p[l.ln1], da, s.eps, (dx, true), take(g, l.ln1));
}

/// The forward pass of a Llama model on slices, kept for its backward.
pub(super) struct LlamaTape<T> {
    layout: ParamLayout,
    index: DecoderIndex,
    params: Vec<Tensor>,
    shape: Shape,
    tokens: Vec<u32>,
    rotary: Rotary<T>,
    layers: Vec<LayerActs<T>>,
    /// The last layer's output, and after the final RMSNorm.
    last: Vec<T>,
    hidden: Vec<T>,
    /// The full logits, made only when asked for ([`tape::Tape::logits`]).
    logits: OnceLock<Tensor>,
}

impl<T: Real> LlamaTape<T> {
    pub fn forward(arch: &Llama, params: &[Tensor], tokens: &Tensor) -> Result<Self> {
        let c = &arch.config;
        let (n, t) = tokens.dims2()?;
        arch.check_tokens(tokens, t)?;
        let tokens = tokens
            .to_dtype(candle_core::DType::U32)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let d = c.head_width();
        let shape = Shape {
            n,
            t,
            e: c.hidden_size,
            f: c.intermediate_size,
            vocab: c.vocab_size,
            eps: c.rms_norm_eps,
            attn: CausalDims {
                n,
                t,
                heads: c.num_attention_heads,
                kv_heads: c.kv_heads(),
                d,
                scale: (d as f64).powf(-0.5),
                block: BLOCK,
            },
        };
        let index = DecoderIndex::new(arch);
        let rotary = Rotary::new(t, d, c.rope_theta);
        let e = shape.e;
        let (layers, last, hidden) = with_slices::<T, _>(params, |p| {
            let table = p[index.embed];
            let mut x = Vec::with_capacity(n * t * e);
            for &id in &tokens {
                x.extend_from_slice(&table[id as usize * e..(id as usize + 1) * e]);
            }
            let mut layers = Vec::with_capacity(index.layers.len());
            for l in &index.layers {
                let (acts, out) = layer_forward(p, l, &shape, &rotary, x);
                layers.push(acts);
                x = out;
            }
            let mut hidden = vec![T::zero(); x.len()];
            rms_norm_into(&x, p[index.norm], shape.eps, &mut hidden);
            (layers, x, hidden)
        })?;
        Ok(Self {
            layout: arch.layout.clone(),
            index,
            params: params.to_vec(),
            shape,
            tokens,
            rotary,
            layers,
            last,
            hidden,
            logits: OnceLock::new(),
        })
    }

    /// Every gradient, given the head's: `head` writes the head weight's gradient into the slice
    /// it is handed and returns the gradient of the hidden states after the final RMSNorm.
    fn backward_pass(
        &self,
        p: &[&[T]],
        g: &mut [&mut [T]],
        head: impl FnOnce(&[T], &mut [T]) -> Vec<T>,
    ) {
        let (s, ix) = (&self.shape, &self.index);
        let dhead = take(g, ix.head);
        let dhidden = head(p[ix.head], dhead);
        let mut dx = vec![T::zero(); s.rows() * s.e];
        rms_norm_backward_into(
            &self.last,
            p[ix.norm],
            &dhidden,
            s.eps,
            (&mut dx, false),
            take(g, ix.norm),
        );
        drop(dhidden);
        for (l, acts) in ix.layers.iter().zip(&self.layers).rev() {
            layer_backward(p, g, l, s, &self.rotary, acts, &mut dx);
        }
        // The embedding rows looked up: a tied head's gradient is the same slice, already
        // holding the head's part.
        let dembed = match ix.head == ix.embed {
            true => dhead,
            false => take(g, ix.embed),
        };
        let e = s.e;
        for (&id, row) in self.tokens.iter().zip(dx.chunks_exact(e)) {
            let dst = &mut dembed[id as usize * e..(id as usize + 1) * e];
            for (a, &b) in dst.iter_mut().zip(row) {
                *a += b;
            }
        }
    }

    fn gradients(&self, head: impl FnOnce(&[T], &mut [T]) -> Vec<T>) -> Result<Vec<Tensor>> {
        let mut grads = Gradients::<T>::new(&self.layout);
        with_slices::<T, _>(&self.params, |p| {
            let mut g = grads.slices(&self.layout);
            self.backward_pass(p, &mut g, head);
        })?;
        grads.into_tensors(&self.layout)
    }
}

impl<T: Real> tape::Tape for LlamaTape<T> {
    /// The full logits (n × t × vocabulary), computed on the first call: the training path
    /// ([`Self::loss_backward`]) never needs them whole.
    fn logits(&self) -> &Tensor {
        self.logits.get_or_init(|| {
            let s = &self.shape;
            let rows = s.rows();
            let mut logits = vec![T::zero(); rows * s.vocab];
            with_slices::<T, _>(&self.params, |p| {
                let dims = (rows, s.e, s.vocab);
                linear_into(
                    &self.hidden,
                    p[self.index.head],
                    None,
                    false,
                    dims,
                    (&mut logits, s.vocab),
                );
            })
            .expect("the tape's tensors were checked as CPU and contiguous when it was made");
            Tensor::from_vec(logits, (s.n, s.t, s.vocab), &Device::Cpu)
                .expect("the logits have n × t × vocabulary elements")
        })
    }

    fn backward(self: Box<Self>, dlogits: &Tensor) -> Result<Vec<Tensor>> {
        let s = self.shape;
        if dlogits.dims() != [s.n, s.t, s.vocab] {
            return Err(ModelError::config(
                FAMILY,
                format!("the logits' gradient has shape {:?}", dlogits.dims()),
            ));
        }
        let dlogits = tape::to_vec::<T>(dlogits)?;
        self.gradients(|w, dw| {
            let rows = s.rows();
            let mut dhidden = vec![T::zero(); rows * s.e];
            let dims = (rows, s.e, s.vocab);
            let dy = (dlogits.as_slice(), s.vocab);
            linear_backward_into(
                &self.hidden,
                w,
                dy,
                dims,
                Some((&mut dhidden, false)),
                dw,
                None,
            );
            dhidden
        })
    }

    /// The mean next-token cross-entropy through the fused head (`ops::cpu::vocab`): only the
    /// rows that predict a token are multiplied, a chunk at a time.
    fn loss_backward(self: Box<Self>, target: &Target, weight: f64) -> Result<(f64, Vec<Tensor>)> {
        let Target::NextTokens { tokens, mask } = *target else {
            return Err(ModelError::config(
                FAMILY,
                "a language model is trained on next tokens, not classes",
            ));
        };
        let (t, count) = (self.shape.t, self.tokens.len());
        if tokens.len() != count || mask.is_some_and(|m| m.len() != count) {
            return Err(ModelError::config(
                FAMILY,
                format!(
                    "the targets have {} tokens, the inputs {count}",
                    tokens.len()
                ),
            ));
        }
        let real = |i: usize| mask.is_none_or(|m| m[i]);
        let rows: Vec<(usize, u32)> = (0..count)
            .filter(|&i| (i + 1) % t != 0 && real(i) && real(i + 1))
            .map(|i| (i, tokens[i + 1]))
            .collect();
        if let Some(&(_, id)) = rows
            .iter()
            .find(|&&(_, id)| id as usize >= self.shape.vocab)
        {
            return Err(ModelError::config(
                FAMILY,
                format!(
                    "target token {id} is beyond the vocabulary of {}",
                    self.shape.vocab
                ),
            ));
        }
        let coef = weight / rows.len().max(1) as f64;
        let mut loss = 0.0;
        let grads = self.gradients(|w, dw| {
            let mut dhidden = vec![T::zero(); self.hidden.len()];
            let h = (self.hidden.as_slice(), self.shape.e);
            loss = next_token_loss_into(h, w, &rows, coef, (&mut dhidden, dw));
            dhidden
        })?;
        Ok((loss * coef, grads))
    }
}
