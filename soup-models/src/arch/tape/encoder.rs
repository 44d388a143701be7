//! One pre-norm transformer encoder layer on slices, forward and backward, as CLIP's and DINOv2's
//! towers run it: h1 = h + λ1 ⊙ Attn(LN1(h)), h2 = h1 + λ2 ⊙ MLP(LN2(h1)), with LayerScale λ
//! (DINOv2) or without (CLIP).

use super::take;
use crate::ops::cpu::slices::{
    attention_backward_into, attention_into, gelu_backward_into, gelu_into,
    layer_norm_backward_into, layer_norm_into, linear_backward_into, linear_into,
    quick_gelu_backward_into, quick_gelu_into,
};
use crate::ops::cpu::Real;

/// Positions in the layout of one layer's tensors: (weight, bias) pairs, and LayerScale's
/// λ1 and λ2 where the family has them.
#[derive(Clone, Copy)]
pub(crate) struct LayerIndex {
    pub ln1: (usize, usize),
    pub q: (usize, usize),
    pub k: (usize, usize),
    pub v: (usize, usize),
    pub out: (usize, usize),
    pub ln2: (usize, usize),
    pub fc1: (usize, usize),
    pub fc2: (usize, usize),
    pub layer_scale: Option<(usize, usize)>,
}

/// The MLP's activation.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Activation {
    /// x·σ(1.702 x) (CLIP).
    QuickGelu,
    /// x·Φ(x), the exact GELU (DINOv2).
    Gelu,
}

impl Activation {
    /// Its name as a config's `hidden_act` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Activation::QuickGelu => "quick_gelu",
            Activation::Gelu => "gelu",
        }
    }
}

/// Shapes of one pass: images n, tokens t, width e, MLP width f, heads, the attention scale,
/// LayerNorm's ε and the activation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerShape {
    pub n: usize,
    pub t: usize,
    pub e: usize,
    pub f: usize,
    pub heads: usize,
    pub scale: f64,
    pub eps: f64,
    pub activation: Activation,
}

impl LayerShape {
    /// The shape of a ViT's layers for n images of t tokens, with the attention scale
    /// 1/√(e / heads).
    pub fn vit(
        (n, t): (usize, usize),
        (e, f, heads): (usize, usize, usize),
        eps: f64,
        activation: Activation,
    ) -> Self {
        let scale = ((e / heads) as f64).powf(-0.5);
        Self {
            n,
            t,
            e,
            f,
            heads,
            scale,
            eps,
            activation,
        }
    }

    pub fn rows(&self) -> usize {
        self.n * self.t
    }
}

/// What one layer keeps for its backward: its input h, a = LN1(h), q|k|v, the attention output
/// o, h1, c = LN2(h1), u = c W1ᵀ + b1, v = act(u), and with LayerScale the two branch outputs
/// before scaling.
pub(crate) struct LayerActs<T> {
    h: Vec<T>,
    a: Vec<T>,
    qkv: Vec<T>,
    o: Vec<T>,
    h1: Vec<T>,
    c: Vec<T>,
    u: Vec<T>,
    v: Vec<T>,
    branches: Option<(Vec<T>, Vec<T>)>,
}

/// x += λ ⊙ y, row by row (λ as wide as a row).
fn add_scaled<T: Real>(x: &mut [T], y: &[T], lambda: &[T]) {
    for (xr, yr) in x
        .chunks_exact_mut(lambda.len())
        .zip(y.chunks_exact(lambda.len()))
    {
        for ((a, &b), &l) in xr.iter_mut().zip(yr).zip(lambda) {
            *a += l * b;
        }
    }
}

/// y = LN(x) into a fresh buffer.
pub(crate) fn layer_norm<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    layer_norm_into(x, w, b, eps, &mut y);
    y
}

/// The layer's forward pass from its input `h`: what it keeps, and its output h2.
pub(crate) fn layer_forward<T: Real>(
    p: &[&[T]],
    l: &LayerIndex,
    s: LayerShape,
    h: Vec<T>,
) -> (LayerActs<T>, Vec<T>) {
    let (rows, e, f) = (s.rows(), s.e, s.f);
    let a = layer_norm(&h, p[l.ln1.0], p[l.ln1.1], s.eps);
    let mut qkv = vec![T::zero(); rows * 3 * e];
    for (part, (wi, bi)) in [l.q, l.k, l.v].into_iter().enumerate() {
        let dst = (&mut qkv[part * e..], 3 * e);
        linear_into(&a, p[wi], Some(p[bi]), false, (rows, e, e), dst);
    }
    let mut o = vec![T::zero(); rows * e];
    attention_into(&qkv, (s.n, s.t, e), s.heads, s.scale, &mut o);
    // A branch added to the residual stream: straight into it without LayerScale, else
    // computed apart (its λ gradient needs it) and added scaled.
    let branch = |x: &[T],
                  (w, b): (usize, usize),
                  inp: usize,
                  stream: &mut Vec<T>,
                  lambda: Option<usize>| {
        match lambda {
            None => {
                linear_into(x, p[w], Some(p[b]), true, (rows, inp, e), (stream, e));
                None
            }
            Some(li) => {
                let mut y = vec![T::zero(); rows * e];
                linear_into(x, p[w], Some(p[b]), false, (rows, inp, e), (&mut y, e));
                add_scaled(stream, &y, p[li]);
                Some(y)
            }
        }
    };
    let mut h1 = h.clone();
    let s1 = branch(&o, l.out, e, &mut h1, l.layer_scale.map(|ls| ls.0));
    let c = layer_norm(&h1, p[l.ln2.0], p[l.ln2.1], s.eps);
    let mut u = vec![T::zero(); rows * f];
    linear_into(
        &c,
        p[l.fc1.0],
        Some(p[l.fc1.1]),
        false,
        (rows, e, f),
        (&mut u, f),
    );
    let mut v = vec![T::zero(); rows * f];
    match s.activation {
        Activation::QuickGelu => quick_gelu_into(&u, &mut v),
        Activation::Gelu => gelu_into(&u, &mut v),
    }
    let mut h2 = h1.clone();
    let s2 = branch(&v, l.fc2, f, &mut h2, l.layer_scale.map(|ls| ls.1));
    let branches = s1.zip(s2);
    let acts = LayerActs {
        h,
        a,
        qkv,
        o,
        h1,
        c,
        u,
        v,
        branches,
    };
    (acts, h2)
}

/// dy of a branch from the residual stream's gradient `dh`: dh itself without LayerScale, else
/// dh ⊙ λ, with dλ = Σ_rows dh ⊙ branch written into `dlambda`.
fn branch_gradient<T: Real>(dh: &[T], lambda: &[T], branch: &[T], dlambda: &mut [T], dy: &mut [T]) {
    dlambda.fill(T::zero());
    let e = lambda.len();
    for ((dr, br), yr) in dh
        .chunks_exact(e)
        .zip(branch.chunks_exact(e))
        .zip(dy.chunks_exact_mut(e))
    {
        for j in 0..e {
            dlambda[j] += dr[j] * br[j];
            yr[j] = dr[j] * lambda[j];
        }
    }
}

/// The layer's backward: `dh` holds the gradient of its output h2 and leaves with that of its
/// input h; every tensor's gradient is written into its slice of `g` (each taken once).
pub(crate) fn layer_backward<T: Real>(
    p: &[&[T]],
    g: &mut [&mut [T]],
    l: &LayerIndex,
    s: LayerShape,
    acts: &LayerActs<T>,
    dh: &mut [T],
) {
    let (rows, e, f) = (s.rows(), s.e, s.f);
    // The MLP branch's output gradient: dh, or dh ⊙ λ2.
    let mut scaled = vec![T::zero(); if l.layer_scale.is_some() { rows * e } else { 0 }];
    let dy2: &[T] = match (l.layer_scale, &acts.branches) {
        (Some((_, l2)), Some((_, s2))) => {
            branch_gradient(dh, p[l2], s2, take(g, l2), &mut scaled);
            &scaled
        }
        _ => dh,
    };
    let mut dv = vec![T::zero(); rows * f];
    let (dw, db) = (take(g, l.fc2.0), take(g, l.fc2.1));
    linear_backward_into(
        &acts.v,
        p[l.fc2.0],
        (dy2, e),
        (rows, f, e),
        Some((&mut dv, false)),
        dw,
        Some(db),
    );
    let mut du = vec![T::zero(); rows * f];
    match s.activation {
        Activation::QuickGelu => quick_gelu_backward_into(&acts.u, &dv, &mut du),
        Activation::Gelu => gelu_backward_into(&acts.u, &dv, &mut du),
    }
    drop(dv);
    let mut dc = vec![T::zero(); rows * e];
    let (dw, db) = (take(g, l.fc1.0), take(g, l.fc1.1));
    linear_backward_into(
        &acts.c,
        p[l.fc1.0],
        (&du, f),
        (rows, e, f),
        Some((&mut dc, false)),
        dw,
        Some(db),
    );
    drop(du);
    // dh1 = dh2 + the MLP branch's input gradient through LN2.
    let (dw, db) = (take(g, l.ln2.0), take(g, l.ln2.1));
    layer_norm_backward_into(&acts.h1, p[l.ln2.0], &dc, s.eps, (dh, true), dw, db);
    let dy1: &[T] = match (l.layer_scale, &acts.branches) {
        (Some((l1, _)), Some((s1, _))) => {
            branch_gradient(dh, p[l1], s1, take(g, l1), &mut scaled);
            &scaled
        }
        _ => dh,
    };
    let mut dout = vec![T::zero(); rows * e];
    let (dw, db) = (take(g, l.out.0), take(g, l.out.1));
    linear_backward_into(
        &acts.o,
        p[l.out.0],
        (dy1, e),
        (rows, e, e),
        Some((&mut dout, false)),
        dw,
        Some(db),
    );
    let mut dqkv = vec![T::zero(); rows * 3 * e];
    attention_backward_into(&acts.qkv, &dout, (s.n, s.t, e), s.heads, s.scale, &mut dqkv);
    let da = &mut dc;
    for (part, (wi, bi)) in [l.q, l.k, l.v].into_iter().enumerate() {
        let (dw, db) = (take(g, wi), take(g, bi));
        let dy = (&dqkv[part * e..], 3 * e);
        linear_backward_into(
            &acts.a,
            p[wi],
            dy,
            (rows, e, e),
            Some((&mut da[..], part > 0)),
            dw,
            Some(db),
        );
    }
    // dh = dh1 + the attention branch's input gradient through LN1.
    let (dw, db) = (take(g, l.ln1.0), take(g, l.ln1.1));
    layer_norm_backward_into(&acts.h, p[l.ln1.0], da, s.eps, (dh, true), dw, db);
}
