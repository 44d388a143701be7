//! The hand-written forward and backward pass of the DINOv2 classifier (what
//! [`Dinov2Classifier::head_input`] and `forward` compute), on slices. See `arch/tape`.

use candle_core::Tensor;

use super::{Dinov2Classifier, FAMILY};
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
#[derive(Default)]
struct Index {
    patch: (usize, usize),
    cls: usize,
    position: usize,
    layers: Vec<LayerIndex>,
    norm: (usize, usize),
    head: (usize, usize),
}

impl Index {
    fn new(arch: &Dinov2Classifier) -> Self {
        let at = |name: &str| arch.index[name];
        let wb = |name: &str| (at(&format!("{name}.weight")), at(&format!("{name}.bias")));
        let layers = (0..arch.config.num_hidden_layers)
            .map(|i| {
                let l = format!("dinov2.encoder.layer.{i}");
                let a = format!("{l}.attention.attention");
                LayerIndex {
                    ln1: wb(&format!("{l}.norm1")),
                    q: wb(&format!("{a}.query")),
                    k: wb(&format!("{a}.key")),
                    v: wb(&format!("{a}.value")),
                    out: wb(&format!("{l}.attention.output.dense")),
                    ln2: wb(&format!("{l}.norm2")),
                    fc1: wb(&format!("{l}.mlp.fc1")),
                    fc2: wb(&format!("{l}.mlp.fc2")),
                    layer_scale: Some((
                        at(&format!("{l}.layer_scale1.lambda1")),
                        at(&format!("{l}.layer_scale2.lambda1")),
                    )),
                }
            })
            .collect();
        let emb = "dinov2.embeddings";
        Self {
            patch: wb(&format!("{emb}.patch_embeddings.projection")),
            cls: at(&format!("{emb}.cls_token")),
            position: at(&format!("{emb}.position_embeddings")),
            layers,
            norm: wb("dinov2.layernorm"),
            head: wb("classifier"),
        }
    }
}

/// Shapes of one pass: the encoder's, patches per image np, patch length cp, classes k.
#[derive(Clone, Copy)]
struct Dims {
    layer: LayerShape,
    np: usize,
    cp: usize,
    k: usize,
}

/// The forward pass of a DINOv2 classifier, kept for its backward.
pub(super) struct Dinov2Tape<T> {
    layout: soup_core::ParamLayout,
    index: Index,
    params: Vec<Tensor>,
    d: Dims,
    patches: Vec<T>,
    layers: Vec<LayerActs<T>>,
    /// The last layer's output (n·t × e), and the head's input [CLS ‖ mean of patches] (n × 2e).
    last: Vec<T>,
    head_input: Vec<T>,
    logits: Tensor,
}

impl<T: Real> Dinov2Tape<T> {
    pub(super) fn forward(
        arch: &Dinov2Classifier,
        params: &[Tensor],
        images: &Tensor,
    ) -> Result<Self> {
        let c = &arch.config;
        let (n, patches) = patch_rows::<T>(
            FAMILY,
            images,
            (c.num_channels, c.image_size, c.patch_size),
            (params.len(), arch.layout.len()),
        )?;
        let (ps, g, ch) = (c.patch_size, c.image_size / c.patch_size, c.num_channels);
        let e = c.hidden_size;
        let d = Dims {
            layer: LayerShape::vit(
                (n, g * g + 1),
                (e, e * c.mlp_ratio, c.num_attention_heads),
                c.layer_norm_eps,
                Activation::Gelu,
            ),
            np: g * g,
            cp: ch * ps * ps,
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

fn forward_pass<T: Real>(
    p: &[&[T]],
    ix: &Index,
    d: Dims,
    patches: Vec<T>,
) -> Result<Dinov2Tape<T>> {
    let Dims { np, cp, k, .. } = d;
    let LayerShape { n, t, e, eps, .. } = d.layer;
    let mut embeds = vec![T::zero(); n * np * e];
    let (kw, kb) = ix.patch;
    linear_into(
        &patches,
        p[kw],
        Some(p[kb]),
        false,
        (n * np, cp, e),
        (&mut embeds, e),
    );
    // [CLS | patches] + positions.
    let mut h = tokens(p[ix.cls], &embeds, p[ix.position], np);
    let mut layers = Vec::with_capacity(ix.layers.len());
    for l in &ix.layers {
        let (acts, out) = layer_forward(p, l, d.layer, h);
        layers.push(acts);
        h = out;
    }
    let normed = layer_norm(&h, p[ix.norm.0], p[ix.norm.1], eps);
    let mut head_input = vec![T::zero(); n * 2 * e];
    let inv = T::from_f64(1.0 / np as f64);
    for i in 0..n {
        let out = &mut head_input[i * 2 * e..(i + 1) * 2 * e];
        out[..e].copy_from_slice(&normed[i * t * e..(i * t + 1) * e]);
        let mean = &mut out[e..];
        for j in 1..t {
            for (m, &v) in mean
                .iter_mut()
                .zip(&normed[(i * t + j) * e..(i * t + j + 1) * e])
            {
                *m += v;
            }
        }
        for m in mean.iter_mut() {
            *m *= inv;
        }
    }
    let mut logits = vec![T::zero(); n * k];
    let (hw, hb) = ix.head;
    linear_into(
        &head_input,
        p[hw],
        Some(p[hb]),
        false,
        (n, 2 * e, k),
        (&mut logits, k),
    );
    Ok(Dinov2Tape {
        layout: soup_core::ParamLayout::new(Vec::new()),
        index: Index::default(),
        params: Vec::new(),
        d,
        patches,
        layers,
        last: h,
        head_input,
        logits: Tensor::from_vec(logits, (n, k), &candle_core::Device::Cpu)?,
    })
}

impl<T: Real> Tape for Dinov2Tape<T> {
    fn logits(&self) -> &Tensor {
        &self.logits
    }

    fn backward(self: Box<Self>, dlogits: &Tensor) -> Result<Vec<Tensor>> {
        let dims = (self.d.layer.n, self.d.k);
        backward_with(
            FAMILY,
            &self.layout,
            &self.params,
            dims,
            dlogits,
            |p, g, dl| self.backward_pass(p, g, dl),
        )
    }
}

impl<T: Real> Dinov2Tape<T> {
    /// Writes the gradient of every parameter into `g` (each slice taken once).
    fn backward_pass(&self, p: &[&[T]], g: &mut [&mut [T]], dlogits: &[T]) {
        let Dims { np, cp, k, .. } = self.d;
        let LayerShape { n, t, e, eps, .. } = self.d.layer;
        let ix = &self.index;
        let rows = self.d.layer.rows();
        // logits = head_input Wᵀ + b
        let mut dinput = vec![T::zero(); n * 2 * e];
        let (hw, hb) = ix.head;
        let (dhw, dhb) = (take(g, hw), take(g, hb));
        linear_backward_into(
            &self.head_input,
            p[hw],
            (dlogits, k),
            (n, 2 * e, k),
            Some((&mut dinput, false)),
            dhw,
            Some(dhb),
        );
        // head_input = [CLS ‖ mean of the patch tokens] of LN(last).
        let mut dnormed = vec![T::zero(); rows * e];
        let inv = T::from_f64(1.0 / np as f64);
        for i in 0..n {
            let di = &dinput[i * 2 * e..(i + 1) * 2 * e];
            dnormed[i * t * e..(i * t + 1) * e].copy_from_slice(&di[..e]);
            for j in 1..t {
                for (o, &v) in dnormed[(i * t + j) * e..(i * t + j + 1) * e]
                    .iter_mut()
                    .zip(&di[e..])
                {
                    *o = v * inv;
                }
            }
        }
        let mut dh = vec![T::zero(); rows * e];
        let (nw, nb) = ix.norm;
        let (dw, db) = (take(g, nw), take(g, nb));
        layer_norm_backward_into(&self.last, p[nw], &dnormed, eps, (&mut dh, false), dw, db);
        for (l, acts) in ix.layers.iter().zip(&self.layers).rev() {
            layer_backward(p, g, l, self.d.layer, acts, &mut dh);
        }
        // h = [CLS | patches Kᵀ + b] + positions.
        let (dcls, dposition) = (take(g, ix.cls), take(g, ix.position));
        let dembeds = tokens_backward(&dh, dcls, dposition, np);
        let (kw, kb) = ix.patch;
        let (dkw, dkb) = (take(g, kw), take(g, kb));
        linear_backward_into(
            &self.patches,
            p[kw],
            (&dembeds, e),
            (n * np, cp, e),
            None,
            dkw,
            Some(dkb),
        );
    }
}
