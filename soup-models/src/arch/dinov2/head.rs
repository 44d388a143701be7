//! The DINOv2 classifier's head on slices, forward and backward (what
//! [`Dinov2Classifier::head_input`] and `forward` compute after the encoder): the final LayerNorm,
//! [CLS ‖ mean of the patch tokens] and the linear head. The encoder is the shared ViT's
//! ([`crate::arch::vit`]).

use std::collections::HashMap;

use super::Dinov2Config;
use crate::arch::tape::encoder::{layer_norm, LayerShape};
use crate::arch::tape::take;
use crate::arch::vit::{VitHead, VitTapeHead};
use crate::ops::cpu::slices::{layer_norm_backward_into, linear_backward_into, linear_into};
use crate::ops::cpu::Real;

/// What the head keeps for its backward: the last layer's output (n·t × e), and the head's input
/// [CLS ‖ mean of patches] (n × 2e).
pub(crate) struct Dinov2Head<T> {
    norm: (usize, usize),
    head: (usize, usize),
    k: usize,
    last: Vec<T>,
    head_input: Vec<T>,
}

impl VitTapeHead for Dinov2Config {
    type Head<T: Real> = Dinov2Head<T>;

    fn head_forward<T: Real>(
        &self,
        index: &HashMap<String, usize>,
        p: &[&[T]],
        h: Vec<T>,
        s: LayerShape,
    ) -> (Dinov2Head<T>, Vec<T>) {
        let c = self;
        let at = |name: &str| index[name];
        let norm = (at("dinov2.layernorm.weight"), at("dinov2.layernorm.bias"));
        let head = (at("classifier.weight"), at("classifier.bias"));
        let k = c.num_classes;
        let LayerShape { n, t, e, eps, .. } = s;
        let normed = layer_norm(&h, p[norm.0], p[norm.1], eps);
        let mut head_input = vec![T::zero(); n * 2 * e];
        let inv = T::from_f64(1.0 / (t - 1) as f64);
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
        let (hw, hb) = head;
        linear_into(
            &head_input,
            p[hw],
            Some(p[hb]),
            false,
            (n, 2 * e, k),
            (&mut logits, k),
        );
        let pass = Dinov2Head {
            norm,
            head,
            k,
            last: h,
            head_input,
        };
        (pass, logits)
    }
}

impl<T: Real> VitHead<T> for Dinov2Head<T> {
    fn backward(&self, p: &[&[T]], g: &mut [&mut [T]], s: LayerShape, dlogits: &[T]) -> Vec<T> {
        let k = self.k;
        let LayerShape { n, t, e, eps, .. } = s;
        // logits = head_input Wᵀ + b
        let mut dinput = vec![T::zero(); n * 2 * e];
        let (hw, hb) = self.head;
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
        let mut dnormed = vec![T::zero(); s.rows() * e];
        let inv = T::from_f64(1.0 / (t - 1) as f64);
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
        let mut dh = vec![T::zero(); s.rows() * e];
        let (nw, nb) = self.norm;
        let (dw, db) = (take(g, nw), take(g, nb));
        layer_norm_backward_into(&self.last, p[nw], &dnormed, eps, (&mut dh, false), dw, db);
        dh
    }
}
