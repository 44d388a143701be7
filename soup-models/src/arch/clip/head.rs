//! The CLIP classifier's head on slices, forward and backward (what [`ClipClassifier::forward`]
//! computes after the encoder): the class token's LayerNorm, the visual projection, the features'
//! L2 normalisation and the linear head. The encoder is the shared ViT's ([`crate::arch::vit`]).

use std::collections::HashMap;

use super::ClipVitConfig;
use crate::arch::tape::encoder::{layer_norm, LayerShape};
use crate::arch::tape::take;
use crate::arch::vit::{VitHead, VitTapeHead};
use crate::ops::cpu::slices::{layer_norm_backward_into, linear_backward_into, linear_into};
use crate::ops::cpu::Real;

/// What the head keeps for its backward: the class tokens of the last layer's output (n × e),
/// their LayerNorm, the norms of the projected features (n) and the unit features z (n × pd).
pub(crate) struct ClipHead<T> {
    post: (usize, usize),
    projection: usize,
    head: (usize, usize),
    pd: usize,
    k: usize,
    pooled_in: Vec<T>,
    pooled: Vec<T>,
    norms: Vec<T>,
    z: Vec<T>,
}

impl VitTapeHead for ClipVitConfig {
    type Head<T: Real> = ClipHead<T>;

    fn head_forward<T: Real>(
        &self,
        index: &HashMap<String, usize>,
        p: &[&[T]],
        h: Vec<T>,
        s: LayerShape,
    ) -> (ClipHead<T>, Vec<T>) {
        let c = self;
        let at = |name: &str| index[name];
        let post = (
            at("vision_model.post_layernorm.weight"),
            at("vision_model.post_layernorm.bias"),
        );
        let projection = at("visual_projection.weight");
        let head = (
            at("classification_head.weight"),
            at("classification_head.bias"),
        );
        let (pd, k) = (c.projection_dim, c.num_classes);
        let LayerShape { n, t, e, eps, .. } = s;
        let pooled_in: Vec<T> = (0..n)
            .flat_map(|i| h[i * t * e..(i * t + 1) * e].iter().copied())
            .collect();
        let pooled = layer_norm(&pooled_in, p[post.0], p[post.1], eps);
        let mut features = vec![T::zero(); n * pd];
        linear_into(
            &pooled,
            p[projection],
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
        let (hw, hb) = head;
        linear_into(&z, p[hw], Some(p[hb]), false, (n, pd, k), (&mut logits, k));
        let pass = ClipHead {
            post,
            projection,
            head,
            pd,
            k,
            pooled_in,
            pooled,
            norms,
            z,
        };
        (pass, logits)
    }
}

impl<T: Real> VitHead<T> for ClipHead<T> {
    fn backward(&self, p: &[&[T]], g: &mut [&mut [T]], s: LayerShape, dlogits: &[T]) -> Vec<T> {
        let (pd, k) = (self.pd, self.k);
        let LayerShape { n, t, e, eps, .. } = s;
        // logits = z Hᵀ + hb
        let mut dz = vec![T::zero(); n * pd];
        let (hw, hb) = self.head;
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
        let dproj = take(g, self.projection);
        linear_backward_into(
            &self.pooled,
            p[self.projection],
            (&dfeatures, pd),
            (n, e, pd),
            Some((&mut dpooled, false)),
            dproj,
            None,
        );
        let mut dpooled_in = vec![T::zero(); n * e];
        let (pw, pb) = self.post;
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
        let mut dh = vec![T::zero(); s.rows() * e];
        for i in 0..n {
            dh[i * t * e..(i * t + 1) * e].copy_from_slice(&dpooled_in[i * e..(i + 1) * e]);
        }
        dh
    }
}
