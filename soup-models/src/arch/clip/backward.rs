//! The hand-written forward and backward pass of the CLIP classifier (what
//! [`ClipClassifier::image_features`] and `forward` compute), on slices, through the fused kernels'
//! slice functions. See `arch/tape`.

use candle_core::Tensor;

use super::ClipClassifier;
use crate::arch::tape::encoder::{
    layer_backward, layer_forward, layer_norm, Activation, LayerActs, LayerIndex, LayerShape,
};
use crate::arch::tape::{
    backward_with, patch_rows, take, tokens, tokens_backward, with_slices, Tape,
};
use crate::error::Result;
use crate::ops::cpu::slices::{layer_norm_backward_into, linear_backward_into, linear_into};
use crate::ops::cpu::Real;

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
    /// A placeholder until the forward pass fills in the real one.
    fn empty() -> Self {
        Self {
            patch: 0,
            class: 0,
            position: 0,
            pre: (0, 0),
            layers: Vec::new(),
            post: (0, 0),
            projection: 0,
            head: (0, 0),
        }
    }

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
                    layer_scale: None,
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

/// Shapes of one pass: the encoder's, patches per image np, patch length cp (channels ·
/// patch²), projection width pd, classes k.
#[derive(Clone, Copy)]
struct Dims {
    layer: LayerShape,
    np: usize,
    cp: usize,
    pd: usize,
    k: usize,
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

impl<T: Real> ClipTape<T> {
    pub(super) fn forward(
        arch: &ClipClassifier,
        params: &[Tensor],
        images: &Tensor,
    ) -> Result<Self> {
        let c = &arch.config;
        let (n, patches) = patch_rows::<T>(
            "clip-vit",
            images,
            (c.num_channels, c.image_size, c.patch_size),
            (params.len(), arch.layout.len()),
        )?;
        let (ps, g, ch) = (c.patch_size, c.image_size / c.patch_size, c.num_channels);
        let e = c.hidden_size;
        let d = Dims {
            layer: LayerShape::vit(
                (n, g * g + 1),
                (e, c.intermediate_size, c.num_attention_heads),
                c.layer_norm_eps,
                Activation::QuickGelu,
            ),
            np: g * g,
            cp: ch * ps * ps,
            pd: c.projection_dim,
            k: c.num_classes,
        };
        let index = Index::new(arch);
        let mut tape = with_slices::<T, _>(params, |p| forward_pass(p, &index, d, patches))??;
        tape.layout = arch.layout.clone();
        tape.index = index;
        tape.params = params.to_vec();
        Ok(tape)
    }
}

fn forward_pass<T: Real>(p: &[&[T]], ix: &Index, d: Dims, patches: Vec<T>) -> Result<ClipTape<T>> {
    let Dims { np, cp, pd, k, .. } = d;
    let LayerShape { n, t, e, .. } = d.layer;
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
    let hidden0 = tokens(p[ix.class], &embeds, p[ix.position], np);
    let eps = d.layer.eps;
    let mut h = layer_norm(&hidden0, p[ix.pre.0], p[ix.pre.1], eps);
    let mut layers = Vec::with_capacity(ix.layers.len());
    for l in &ix.layers {
        let (acts, out) = layer_forward(p, l, d.layer, h);
        layers.push(acts);
        h = out;
    }
    let pooled_in: Vec<T> = (0..n)
        .flat_map(|i| h[i * t * e..(i * t + 1) * e].iter().copied())
        .collect();
    let pooled = layer_norm(&pooled_in, p[ix.post.0], p[ix.post.1], eps);
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
    Ok(ClipTape {
        layout: soup_core::ParamLayout::new(Vec::new()),
        index: Index::empty(),
        params: Vec::new(),
        d,
        patches,
        hidden0,
        layers,
        pooled_in,
        pooled,
        norms,
        z,
        logits: Tensor::from_vec(logits, (n, k), &candle_core::Device::Cpu)?,
    })
}

impl<T: Real> Tape for ClipTape<T> {
    fn logits(&self) -> &Tensor {
        &self.logits
    }

    fn backward(self: Box<Self>, dlogits: &Tensor) -> Result<Vec<Tensor>> {
        let dims = (self.d.layer.n, self.d.k);
        backward_with(
            "clip-vit",
            &self.layout,
            &self.params,
            dims,
            dlogits,
            |p, g, dl| self.backward_pass(p, g, dl),
        )
    }
}

impl<T: Real> ClipTape<T> {
    /// Writes the gradient of every parameter into `g` (each slice taken once).
    fn backward_pass(&self, p: &[&[T]], g: &mut [&mut [T]], dlogits: &[T]) {
        let Dims { np, cp, pd, k, .. } = self.d;
        let LayerShape { n, t, e, eps, .. } = self.d.layer;
        let ix = &self.index;
        let rows = self.d.layer.rows();
        // logits = z Hᵀ + hb
        let mut dz = vec![T::zero(); n * pd];
        let (hw, hb) = ix.head;
        let (dhw, dhb) = (take(g, hw), take(g, hb));
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
        let dproj = take(g, ix.projection);
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
        let (dpw, dpb) = (take(g, pw), take(g, pb));
        layer_norm_backward_into(
            &self.pooled_in,
            p[pw],
            &dpooled,
            eps,
            (&mut dpooled_in, false),
            dpw,
            dpb,
        );
        // The gradient of the residual stream: only the class tokens reach the head.
        let mut dh = vec![T::zero(); rows * e];
        for i in 0..n {
            dh[i * t * e..(i * t + 1) * e].copy_from_slice(&dpooled_in[i * e..(i + 1) * e]);
        }
        for (l, acts) in ix.layers.iter().zip(&self.layers).rev() {
            layer_backward(p, g, l, self.d.layer, acts, &mut dh);
        }
        // h = LN_pre(hidden0), hidden0 = [class | patches Kᵀ] + positions.
        let mut dhidden0 = vec![T::zero(); rows * e];
        let (prw, prb) = ix.pre;
        let (dw, db) = (take(g, prw), take(g, prb));
        layer_norm_backward_into(
            &self.hidden0,
            p[prw],
            &dh,
            eps,
            (&mut dhidden0, false),
            dw,
            db,
        );
        let (dclass, dposition) = (take(g, ix.class), take(g, ix.position));
        let dembeds = tokens_backward(&dhidden0, dclass, dposition, np);
        let dkernel = take(g, ix.patch);
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
