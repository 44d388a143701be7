//! The hand-written forward and backward pass of the CLIP classifier (what
//! [`ClipClassifier::image_features`] and `forward` compute), on slices, through the fused kernels'
//! slice functions. See `arch/tape.rs`.

use candle_core::Tensor;

use super::ClipClassifier;
use crate::arch::tape::{to_vec, with_slices, Gradients, Tape};
use crate::error::{ModelError, Result};
use crate::ops::cpu::slices::{
    attention_backward_into, attention_into, layer_norm_backward_into, layer_norm_into,
    linear_backward_into, linear_into, quick_gelu_backward_into, quick_gelu_into,
};
use crate::ops::cpu::Real;

/// Positions in the layout of one encoder layer's tensors.
#[derive(Clone, Copy)]
struct LayerIndex {
    ln1: (usize, usize),
    q: (usize, usize),
    k: (usize, usize),
    v: (usize, usize),
    out: (usize, usize),
    ln2: (usize, usize),
    fc1: (usize, usize),
    fc2: (usize, usize),
}

/// Positions in the layout of every tensor.
struct Index {
    patch: usize,
    class: usize,
    position: usize,
    pre: (usize, usize),
    layers: Vec<LayerIndex>,
    post: (usize, usize),
    projection: usize,
    head: (usize, usize),
}

impl Index {
    fn new(arch: &ClipClassifier) -> Self {
        let at = |name: &str| arch.index[name];
        let wb = |name: &str| (at(&format!("{name}.weight")), at(&format!("{name}.bias")));
        let layers = (0..arch.config.num_hidden_layers)
            .map(|i| {
                let l = format!("vision_model.encoder.layers.{i}");
                LayerIndex {
                    ln1: wb(&format!("{l}.layer_norm1")),
                    q: wb(&format!("{l}.self_attn.q_proj")),
                    k: wb(&format!("{l}.self_attn.k_proj")),
                    v: wb(&format!("{l}.self_attn.v_proj")),
                    out: wb(&format!("{l}.self_attn.out_proj")),
                    ln2: wb(&format!("{l}.layer_norm2")),
                    fc1: wb(&format!("{l}.mlp.fc1")),
                    fc2: wb(&format!("{l}.mlp.fc2")),
                }
            })
            .collect();
        Self {
            patch: at("vision_model.embeddings.patch_embedding.weight"),
            class: at("vision_model.embeddings.class_embedding"),
            position: at("vision_model.embeddings.position_embedding.weight"),
            pre: wb("vision_model.pre_layrnorm"),
            layers,
            post: wb("vision_model.post_layernorm"),
            projection: at("visual_projection.weight"),
            head: wb("classification_head"),
        }
    }
}

/// Shapes of one pass: images n, patches per image np, tokens t = np + 1, width e, MLP width f,
/// patch length cp (channels · patch²), projection width pd, classes k.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    np: usize,
    t: usize,
    e: usize,
    f: usize,
    cp: usize,
    pd: usize,
    k: usize,
    heads: usize,
    scale: f64,
    eps: f64,
}

impl Dims {
    fn rows(&self) -> usize {
        self.n * self.t
    }
}

/// What one encoder layer keeps: its input h, a = LN1(h), q|k|v, the attention output o,
/// h1 = h + o Woᵀ + bo, c = LN2(h1), u = c W1ᵀ + b1 and v = quick_gelu(u).
struct LayerActs<T> {
    h: Vec<T>,
    a: Vec<T>,
    qkv: Vec<T>,
    o: Vec<T>,
    h1: Vec<T>,
    c: Vec<T>,
    u: Vec<T>,
    v: Vec<T>,
}

/// The forward pass of a CLIP classifier, kept for its backward.
pub(super) struct ClipTape<T> {
    layout: soup_core::ParamLayout,
    index: Index,
    params: Vec<Tensor>,
    d: Dims,
    patches: Vec<T>,
    hidden0: Vec<T>,
    layers: Vec<LayerActs<T>>,
    /// The class tokens of the last layer's output (n × e), their LayerNorm, the norms of the
    /// projected features (n) and the unit features z (n × pd).
    pooled_in: Vec<T>,
    pooled: Vec<T>,
    norms: Vec<T>,
    z: Vec<T>,
    logits: Tensor,
}

/// y = x + (what `f` writes into a fresh buffer's copy of x): the residual stream.
fn plus<T: Real>(x: &[T], f: impl FnOnce(&mut [T])) -> Vec<T> {
    let mut y = x.to_vec();
    f(&mut y);
    y
}

impl<T: Real> ClipTape<T> {
    pub(super) fn forward(
        arch: &ClipClassifier,
        params: &[Tensor],
        images: &Tensor,
    ) -> Result<Self> {
        let c = &arch.config;
        let (n, ch, h, w) = images.dims4()?;
        if ch != c.num_channels || h != c.image_size || w != c.image_size {
            return Err(ModelError::config(
                "clip-vit",
                format!(
                    "images are {ch}×{h}×{w}, the model takes {}×{}×{}",
                    c.num_channels, c.image_size, c.image_size
                ),
            ));
        }
        if params.len() != arch.layout.len() {
            return Err(ModelError::config(
                "clip-vit",
                format!(
                    "forward got {} tensors, the layout has {}",
                    params.len(),
                    arch.layout.len()
                ),
            ));
        }
        let (ps, g) = (c.patch_size, c.image_size / c.patch_size);
        let e = c.hidden_size;
        let d = Dims {
            n,
            np: g * g,
            t: g * g + 1,
            e,
            f: c.intermediate_size,
            cp: ch * ps * ps,
            pd: c.projection_dim,
            k: c.num_classes,
            heads: c.num_attention_heads,
            scale: ((e / c.num_attention_heads) as f64).powf(-0.5),
            eps: c.layer_norm_eps,
        };
        // Patches as rows (n·np × ch·p·p), in the order of the convolution kernel's elements.
        let patches = to_vec::<T>(
            &images
                .to_dtype(T::DTYPE)?
                .reshape((n, ch, g, ps, g, ps))?
                .permute((0, 2, 4, 1, 3, 5))?
                .contiguous()?,
        )?;
        let index = Index::new(arch);
        let state = with_slices::<T, _>(params, |p| forward_pass(p, &index, d, patches))?;
        let (hidden0, layers, pooled_in, pooled, norms, z, logits, patches) = state;
        let logits = Tensor::from_vec(logits, (n, d.k), &candle_core::Device::Cpu)?;
        Ok(Self {
            layout: arch.layout.clone(),
            index,
            params: params.to_vec(),
            d,
            patches,
            hidden0,
            layers,
            pooled_in,
            pooled,
            norms,
            z,
            logits,
        })
    }
}

type Forward<T> = (
    Vec<T>,
    Vec<LayerActs<T>>,
    Vec<T>,
    Vec<T>,
    Vec<T>,
    Vec<T>,
    Vec<T>,
    Vec<T>,
);

fn forward_pass<T: Real>(p: &[&[T]], ix: &Index, d: Dims, patches: Vec<T>) -> Forward<T> {
    let Dims {
        n,
        np,
        t,
        e,
        f,
        cp,
        pd,
        k,
        ..
    } = d;
    let rows = d.rows();
    let mut embeds = vec![T::zero(); n * np * e];
    linear_into(
        &patches,
        p[ix.patch],
        None,
        false,
        (n * np, cp, e),
        (&mut embeds, e),
    );
    // [class | patches] + positions.
    let (class, position) = (p[ix.class], p[ix.position]);
    let mut hidden0 = vec![T::zero(); rows * e];
    for i in 0..n {
        for j in 0..t {
            let src = if j == 0 {
                class
            } else {
                &embeds[(i * np + j - 1) * e..(i * np + j) * e]
            };
            let row = &mut hidden0[(i * t + j) * e..(i * t + j + 1) * e];
            for ((r, &s), &q) in row.iter_mut().zip(src).zip(&position[j * e..(j + 1) * e]) {
                *r = s + q;
            }
        }
    }
    let ln = |x: &[T], (w, b): (usize, usize)| {
        let mut y = vec![T::zero(); x.len()];
        layer_norm_into(x, p[w], p[b], d.eps, &mut y);
        y
    };
    let mut h = ln(&hidden0, ix.pre);
    let mut layers = Vec::with_capacity(ix.layers.len());
    for l in &ix.layers {
        let a = ln(&h, l.ln1);
        let mut qkv = vec![T::zero(); rows * 3 * e];
        for (part, (wi, bi)) in [l.q, l.k, l.v].into_iter().enumerate() {
            let dst = (&mut qkv[part * e..], 3 * e);
            linear_into(&a, p[wi], Some(p[bi]), false, (rows, e, e), dst);
        }
        let mut o = vec![T::zero(); rows * e];
        attention_into(&qkv, (n, t, e), d.heads, d.scale, &mut o);
        let h1 = plus(&h, |y| {
            linear_into(&o, p[l.out.0], Some(p[l.out.1]), true, (rows, e, e), (y, e))
        });
        let c = ln(&h1, l.ln2);
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
        quick_gelu_into(&u, &mut v);
        let h2 = plus(&h1, |y| {
            linear_into(&v, p[l.fc2.0], Some(p[l.fc2.1]), true, (rows, f, e), (y, e))
        });
        layers.push(LayerActs {
            h: std::mem::replace(&mut h, h2),
            a,
            qkv,
            o,
            h1,
            c,
            u,
            v,
        });
    }
    let pooled_in: Vec<T> = (0..n)
        .flat_map(|i| h[i * t * e..(i * t + 1) * e].iter().copied())
        .collect();
    let pooled = ln(&pooled_in, ix.post);
    let mut features = vec![T::zero(); n * pd];
    linear_into(
        &pooled,
        p[ix.projection],
        None,
        false,
        (n, e, pd),
        (&mut features, pd),
    );
    let norms: Vec<T> = features
        .chunks_exact(pd)
        .map(|r| r.iter().fold(T::zero(), |s, &v| s + v * v).sqrt())
        .collect();
    let z: Vec<T> = features
        .chunks_exact(pd)
        .zip(&norms)
        .flat_map(|(r, &s)| r.iter().map(move |&v| v / s))
        .collect();
    let mut logits = vec![T::zero(); n * k];
    let (hw, hb) = ix.head;
    linear_into(&z, p[hw], Some(p[hb]), false, (n, pd, k), (&mut logits, k));
    (
        hidden0, layers, pooled_in, pooled, norms, z, logits, patches,
    )
}

impl<T: Real> Tape for ClipTape<T> {
    fn logits(&self) -> &Tensor {
        &self.logits
    }

    fn backward(self: Box<Self>, dlogits: &Tensor) -> Result<Vec<Tensor>> {
        let d = self.d;
        if dlogits.dims() != [d.n, d.k] {
            return Err(ModelError::config(
                "clip-vit",
                format!("the logits' gradient has shape {:?}", dlogits.dims()),
            ));
        }
        let dlogits = to_vec::<T>(dlogits)?;
        let mut grads = Gradients::<T>::new(&self.layout);
        with_slices::<T, _>(&self.params, |p| {
            let mut g = grads.slices(&self.layout);
            self.backward_pass(p, &mut g, &dlogits);
        })?;
        grads.into_tensors(&self.layout)
    }
}

impl<T: Real> ClipTape<T> {
    /// Writes the gradient of every parameter into `g` (each slice taken once).
    fn backward_pass(&self, p: &[&[T]], g: &mut [&mut [T]], dlogits: &[T]) {
        let Dims {
            n,
            np,
            t,
            e,
            f,
            cp,
            pd,
            k,
            ..
        } = self.d;
        let (d, ix) = (self.d, &self.index);
        let rows = d.rows();
        let mut take = |i: usize| std::mem::take(&mut g[i]);
        // logits = z Hᵀ + hb
        let mut dz = vec![T::zero(); n * pd];
        let (hw, hb) = ix.head;
        let (dhw, dhb) = (take(hw), take(hb));
        linear_backward_into(
            &self.z,
            p[hw],
            (dlogits, k),
            (n, pd, k),
            Some((&mut dz, false)),
            dhw,
            Some(dhb),
        );
        // z = features / ‖features‖: d features = (dz − z·⟨z, dz⟩) / ‖features‖
        let mut dfeatures = vec![T::zero(); n * pd];
        for i in 0..n {
            let r = i * pd..(i + 1) * pd;
            let (zr, dzr) = (&self.z[r.clone()], &dz[r.clone()]);
            let dot = zr.iter().zip(dzr).fold(T::zero(), |s, (&a, &b)| s + a * b);
            for ((o, &a), &b) in dfeatures[r].iter_mut().zip(zr).zip(dzr) {
                *o = (b - a * dot) / self.norms[i];
            }
        }
        let mut dpooled = vec![T::zero(); n * e];
        let dproj = take(ix.projection);
        linear_backward_into(
            &self.pooled,
            p[ix.projection],
            (&dfeatures, pd),
            (n, e, pd),
            Some((&mut dpooled, false)),
            dproj,
            None,
        );
        let mut dpooled_in = vec![T::zero(); n * e];
        let (pw, pb) = ix.post;
        let (dpw, dpb) = (take(pw), take(pb));
        layer_norm_backward_into(
            &self.pooled_in,
            p[pw],
            &dpooled,
            d.eps,
            (&mut dpooled_in, false),
            dpw,
            dpb,
        );
        // The gradient of the residual stream: only the class tokens reach the head.
        let mut dh = vec![T::zero(); rows * e];
        for i in 0..n {
            dh[i * t * e..(i * t + 1) * e].copy_from_slice(&dpooled_in[i * e..(i + 1) * e]);
        }
        let mut dv = vec![T::zero(); rows * f];
        let mut du = vec![T::zero(); rows * f];
        let mut dc = vec![T::zero(); rows * e];
        let mut dout = vec![T::zero(); rows * e];
        let mut dqkv = vec![T::zero(); rows * 3 * e];
        for (l, acts) in ix.layers.iter().zip(&self.layers).rev() {
            // h2 = h1 + v W2ᵀ + b2: dh1 = dh2 + (the MLP's input gradient through LN2).
            let (dw, db) = (take(l.fc2.0), take(l.fc2.1));
            linear_backward_into(
                &acts.v,
                p[l.fc2.0],
                (&dh, e),
                (rows, f, e),
                Some((&mut dv, false)),
                dw,
                Some(db),
            );
            quick_gelu_backward_into(&acts.u, &dv, &mut du);
            let (dw, db) = (take(l.fc1.0), take(l.fc1.1));
            linear_backward_into(
                &acts.c,
                p[l.fc1.0],
                (&du, f),
                (rows, e, f),
                Some((&mut dc, false)),
                dw,
                Some(db),
            );
            let (dw, db) = (take(l.ln2.0), take(l.ln2.1));
            layer_norm_backward_into(&acts.h1, p[l.ln2.0], &dc, d.eps, (&mut dh, true), dw, db);
            // h1 = h + o Woᵀ + bo: dh = dh1 + (the attention's input gradient through LN1).
            let (dw, db) = (take(l.out.0), take(l.out.1));
            linear_backward_into(
                &acts.o,
                p[l.out.0],
                (&dh, e),
                (rows, e, e),
                Some((&mut dout, false)),
                dw,
                Some(db),
            );
            attention_backward_into(&acts.qkv, &dout, (n, t, e), d.heads, d.scale, &mut dqkv);
            let da = &mut dc;
            for (part, (wi, bi)) in [l.q, l.k, l.v].into_iter().enumerate() {
                let (dw, db) = (take(wi), take(bi));
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
            let (dw, db) = (take(l.ln1.0), take(l.ln1.1));
            layer_norm_backward_into(&acts.h, p[l.ln1.0], da, d.eps, (&mut dh, true), dw, db);
        }
        // h = LN_pre(hidden0), hidden0 = [class | patches Kᵀ] + positions.
        let mut dhidden0 = vec![T::zero(); rows * e];
        let (prw, prb) = ix.pre;
        let (dw, db) = (take(prw), take(prb));
        layer_norm_backward_into(
            &self.hidden0,
            p[prw],
            &dh,
            d.eps,
            (&mut dhidden0, false),
            dw,
            db,
        );
        let (dclass, dposition) = (take(ix.class), take(ix.position));
        let mut dembeds = vec![T::zero(); n * np * e];
        for i in 0..n {
            for j in 0..t {
                let src = &dhidden0[(i * t + j) * e..(i * t + j + 1) * e];
                for (a, &v) in dposition[j * e..(j + 1) * e].iter_mut().zip(src) {
                    *a += v;
                }
                if j == 0 {
                    for (a, &v) in dclass.iter_mut().zip(src) {
                        *a += v;
                    }
                } else {
                    dembeds[(i * np + j - 1) * e..(i * np + j) * e].copy_from_slice(src);
                }
            }
        }
        let dkernel = take(ix.patch);
        linear_backward_into(
            &self.patches,
            p[ix.patch],
            (&dembeds, e),
            (n * np, cp, e),
            None,
            dkernel,
            None,
        );
    }
}
