//! What CLIP's and DINOv2's image classifiers share: a ViT encoder (a patch embedding, a first
//! token, learned positions, an optional LayerNorm before the layers, then pre-norm layers
//! h += λ1 ⊙ Attn(LN1(h)), h += λ2 ⊙ MLP(LN2(h)) with or without LayerScale λ), as candle ops
//! ([`Vit::hidden_states`]) and as the hand-written pass on slices ([`VitTape`]). A family
//! describes its encoder by its tensors' names and sizes ([`Vit`]) and writes only its head
//! ([`VitHead`]): what reads the last layer's output and makes the logits.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use soup_core::ParamLayout;

use super::tape::encoder::{layer_backward, layer_forward, layer_norm, Activation, LayerActs};
use super::tape::encoder::{LayerIndex, LayerShape};
use super::tape::{self, backward_with, patch_rows, take, tokens, tokens_backward, with_slices};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::{index_of, parse_config, Architecture, ImageSpec, InputSpec, Params};
use crate::error::{ModelError, Result};
use crate::ops::cpu::slices::{layer_norm_backward_into, linear_backward_into, linear_into};
use crate::ops::cpu::Real;
use crate::ops::{attention, gelu, layer_norm as ln_op, linear, quick_gelu};

/// The names of one encoder layer's tensors: each a prefix of `.weight` and `.bias`, and the
/// LayerScale vectors λ1 and λ2 by their whole names where the family has them.
#[derive(Clone, Debug)]
pub(crate) struct LayerNames {
    pub ln1: String,
    pub q: String,
    pub k: String,
    pub v: String,
    pub out: String,
    pub ln2: String,
    pub fc1: String,
    pub fc2: String,
    pub layer_scale: Option<(String, String)>,
}

impl LayerNames {
    /// The names under `prefix` of, in order: LN1, the q, k, v and output projections, LN2, the
    /// MLP's two layers; and the LayerScale vectors' whole names where the family has them.
    pub fn new(prefix: &str, parts: [&str; 8], layer_scale: Option<(String, String)>) -> Self {
        let [ln1, q, k, v, out, ln2, fc1, fc2] = parts.map(|part| format!("{prefix}.{part}"));
        Self {
            ln1,
            q,
            k,
            v,
            out,
            ln2,
            fc1,
            fc2,
            layer_scale,
        }
    }
}

/// The per-channel mean and standard deviation a ViT classifier's pixels are normalised with
/// (config keys `image_mean`, `image_std`); the family's defaults where absent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Normalisation {
    /// One mean per channel, of pixels in [0, 1].
    #[serde(default)]
    pub image_mean: Option<Vec<f32>>,
    /// One standard deviation per channel.
    #[serde(default)]
    pub image_std: Option<Vec<f32>>,
}

/// The default of a config's `num_channels`: RGB.
pub(crate) fn default_channels() -> usize {
    3
}

/// The sizes of a ViT classifier.
#[derive(Clone, Copy, Debug)]
pub(crate) struct VitSizes {
    pub channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub mlp_width: usize,
    pub layers: usize,
    pub heads: usize,
    pub classes: usize,
    pub eps: f64,
    pub activation: Activation,
}

impl VitSizes {
    /// Tokens per image: the first token and one per patch.
    pub fn tokens(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

/// The names of a ViT encoder's tensors (see [`Vit`]).
#[derive(Clone, Debug)]
pub(crate) struct VitNames {
    pub patch: (String, Option<String>),
    pub first: String,
    pub position: String,
    pub pre_norm: Option<String>,
    pub layers: Vec<LayerNames>,
}

/// A ViT classifier's encoder by its tensors' names, and the whole classifier's layout.
#[derive(Debug)]
pub(crate) struct Vit {
    pub family: &'static str,
    pub sizes: VitSizes,
    /// The patch convolution's kernel (width × channels × patch × patch) and its bias, if any.
    pub patch: (String, Option<String>),
    /// The token before the patches (CLIP's class embedding, DINOv2's CLS token).
    pub first: String,
    /// The learned positions (tokens × width, or 1 × tokens × width).
    pub position: String,
    /// A LayerNorm (prefix of `.weight` and `.bias`) before the first layer (CLIP's).
    pub pre_norm: Option<String>,
    pub layers: Vec<LayerNames>,
    pub layout: ParamLayout,
    pub index: HashMap<String, usize>,
}

impl Vit {
    /// The encoder `names` of a classifier of `layout`, indexed.
    pub fn new(
        family: &'static str,
        sizes: VitSizes,
        names: VitNames,
        layout: ParamLayout,
    ) -> Self {
        let VitNames {
            patch,
            first,
            position,
            pre_norm,
            layers,
        } = names;
        Self {
            family,
            sizes,
            patch,
            first,
            position,
            pre_norm,
            layers,
            index: index_of(&layout),
            layout,
        }
    }

    /// Patches per side.
    fn grid(&self) -> usize {
        self.sizes.image_size / self.sizes.patch_size
    }

    /// Named access to `params`, checked against the layout.
    pub fn params<'a>(&'a self, params: &'a [Tensor]) -> Result<Params<'a>> {
        Params::new(self.family, &self.layout, &self.index, params)
    }

    /// The images' spec: `given` mean and std where the config has them, else the family's
    /// (`defaults`) for RGB and 0.5 per channel otherwise.
    pub fn image_spec(&self, given: &Normalisation, defaults: ([f32; 3], [f32; 3])) -> ImageSpec {
        let channels = self.sizes.channels;
        let pick = |given: &Option<Vec<f32>>, rgb: [f32; 3]| match given {
            Some(v) => v.clone(),
            None if channels == 3 => rgb.to_vec(),
            None => vec![0.5; channels],
        };
        ImageSpec {
            channels,
            height: self.sizes.image_size,
            width: self.sizes.image_size,
            mean: pick(&given.image_mean, defaults.0),
            std: pick(&given.image_std, defaults.1),
        }
    }

    /// The key biases: q·(k + b) = q·k + q·b adds the same q·b to every score of a query, which
    /// softmax cancels, so their gradient is zero (up to rounding).
    pub fn key_biases(&self) -> Vec<String> {
        self.layers
            .iter()
            .map(|l| format!("{}.bias", l.k))
            .collect()
    }

    /// The residual stream after the last layer (n × tokens × width) of normalised images
    /// (n × channels × size × size), as candle ops.
    pub fn hidden_states(&self, p: &Params, images: &Tensor, dtype: DType) -> Result<Tensor> {
        let s = &self.sizes;
        let x = images.to_dtype(dtype)?;
        let (n, ch, h, w) = x.dims4()?;
        if ch != s.channels || h != s.image_size || w != s.image_size {
            return Err(ModelError::config(
                self.family,
                format!(
                    "images are {ch}×{h}×{w}, the model takes {}×{}×{}",
                    s.channels, s.image_size, s.image_size
                ),
            ));
        }
        let (e, ps, g) = (s.width, s.patch_size, self.grid());
        // The patch embedding as reshape + matmul (a stride-p convolution).
        let patches = x
            .reshape((n, ch, g, ps, g, ps))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((n * g * g, ch * ps * ps))?;
        let kernel = p.get(&self.patch.0).reshape((e, ch * ps * ps))?;
        let bias = self.patch.1.as_deref().map(|b| p.get(b));
        let patch_embeds = linear(&patches, &kernel, bias)?.reshape((n, g * g, e))?;
        let first = p
            .get(&self.first)
            .reshape((1, 1, e))?
            .broadcast_as((n, 1, e))?;
        let mut hidden =
            Tensor::cat(&[&first, &patch_embeds], 1)?.broadcast_add(p.get(&self.position))?;
        let ln = |x: &Tensor, name: &str| {
            ln_op(
                x,
                p.get(&format!("{name}.weight")),
                p.get(&format!("{name}.bias")),
                s.eps,
            )
        };
        let lin = |x: &Tensor, name: &str| {
            linear(
                x,
                p.get(&format!("{name}.weight")),
                Some(p.get(&format!("{name}.bias"))),
            )
        };
        // A branch added to the residual stream, scaled by λ where the family has LayerScale.
        let add = |hidden: Tensor, branch: Tensor, lambda: Option<&String>| match lambda {
            None => hidden + branch,
            Some(l) => hidden + branch.broadcast_mul(p.get(l))?,
        };
        if let Some(pre) = &self.pre_norm {
            hidden = ln(&hidden, pre)?;
        }
        let scale = ((e / s.heads) as f64).powf(-0.5);
        for l in &self.layers {
            let x = ln(&hidden, &l.ln1)?;
            // q, k and v in one product: the three projections stacked (a 3e × e copy per layer).
            let part = |name: &str, wb: &str| p.get(&format!("{name}.{wb}"));
            let w = Tensor::cat(
                &[
                    part(&l.q, "weight"),
                    part(&l.k, "weight"),
                    part(&l.v, "weight"),
                ],
                0,
            )?;
            let b = Tensor::cat(
                &[part(&l.q, "bias"), part(&l.k, "bias"), part(&l.v, "bias")],
                0,
            )?;
            let out = attention(&linear(&x, &w, Some(&b))?, s.heads, scale)?;
            let scales = l.layer_scale.as_ref();
            hidden = add(hidden, lin(&out, &l.out)?, scales.map(|s| &s.0))?;
            let x = ln(&hidden, &l.ln2)?;
            let u = lin(&x, &l.fc1)?;
            let v = match s.activation {
                Activation::QuickGelu => quick_gelu(&u)?,
                Activation::Gelu => gelu(&u)?,
            };
            hidden = add(hidden, lin(&v, &l.fc2)?, scales.map(|s| &s.1))?;
        }
        Ok(hidden)
    }

    /// Positions in the layout of the encoder's tensors.
    fn positions(&self) -> EncoderIndex {
        let at = |name: &str| self.index[name];
        let wb = |name: &str| (at(&format!("{name}.weight")), at(&format!("{name}.bias")));
        EncoderIndex {
            patch: (at(&self.patch.0), self.patch.1.as_deref().map(at)),
            first: at(&self.first),
            position: at(&self.position),
            pre: self.pre_norm.as_deref().map(wb),
            layers: self
                .layers
                .iter()
                .map(|l| LayerIndex {
                    ln1: wb(&l.ln1),
                    q: wb(&l.q),
                    k: wb(&l.k),
                    v: wb(&l.v),
                    out: wb(&l.out),
                    ln2: wb(&l.ln2),
                    fc1: wb(&l.fc1),
                    fc2: wb(&l.fc2),
                    layer_scale: l.layer_scale.as_ref().map(|(a, b)| (at(a), at(b))),
                })
                .collect(),
        }
    }
}

/// Positions in the layout of the encoder's tensors (see [`Vit`]).
struct EncoderIndex {
    patch: (usize, Option<usize>),
    first: usize,
    position: usize,
    pre: Option<(usize, usize)>,
    layers: Vec<LayerIndex>,
}

/// A ViT family, described by its configuration: its encoder's sizes and tensors' names, and its
/// head. [`VitClassifier`] of such a configuration is an [`Architecture`].
pub(crate) trait VitFamily:
    Serialize + DeserializeOwned + std::fmt::Debug + Send + Sync + VitTapeHead + 'static
{
    /// The registry name of the family.
    const FAMILY: &'static str;

    /// Checks the configuration: an error naming the family and the first key out of range.
    fn validate(&self) -> Result<()>;

    /// The encoder's sizes.
    fn sizes(&self) -> VitSizes;

    /// The encoder's tensors by name.
    fn names(&self) -> VitNames;

    /// Every tensor of the classifier, in the order of its state dict.
    fn layout(&self) -> ParamLayout;

    /// The `config.json` transformers reads the model with, from the family's `config`.
    fn hf_config(&self, config: serde_json::Value) -> serde_json::Value;

    /// The configured pixel normalisation, and the family's (mean, std) for RGB where absent.
    fn normalisation(&self) -> (&Normalisation, ([f32; 3], [f32; 3]));

    /// What the head reads (n × features), from the last layer's output (n × tokens × width).
    fn head_features(&self, p: &Params, hidden: &Tensor) -> Result<Tensor>;

    /// The logits (n × classes) of the head's features.
    fn head_logits(&self, p: &Params, features: &Tensor) -> Result<Tensor>;

    /// A seeded random initialisation of `layout` ([`Architecture::init`]).
    fn init(&self, layout: &ParamLayout, seed: u64, device: &Device) -> Result<Vec<Tensor>>;
}

/// A ViT family's head on slices, for the hand-written pass ([`tape::Tape`]).
pub(crate) trait VitTapeHead {
    /// What the head's forward pass keeps for its backward, on slices of `T`.
    type Head<T: Real>: VitHead<T>;

    /// The head's forward pass: from the last layer's output `h` (n·t × e, rows of shape `s`)
    /// to the logits (n × classes), and what it keeps for its backward. `index`: the layout's
    /// positions by name.
    fn head_forward<T: Real>(
        &self,
        index: &HashMap<String, usize>,
        p: &[&[T]],
        h: Vec<T>,
        s: LayerShape,
    ) -> (Self::Head<T>, Vec<T>);
}

/// A ViT image classifier of configuration `C`: the encoder, and the family's head on its last
/// layer.
#[derive(Debug)]
pub struct VitClassifier<C> {
    /// The family's configuration.
    pub config: C,
    vit: Vit,
}

#[allow(private_bounds)] // the families are this crate's; `VitFamily` is how they plug in
impl<C: VitFamily> VitClassifier<C> {
    /// The classifier of `config`, checked.
    pub fn new(config: C) -> Result<Self> {
        config.validate()?;
        let vit = Vit::new(C::FAMILY, config.sizes(), config.names(), config.layout());
        Ok(Self { config, vit })
    }

    /// The registry's constructor: the classifier of a JSON configuration.
    pub fn from_config(config: &serde_json::Value) -> Result<Arc<dyn Architecture>> {
        Ok(Arc::new(Self::new(parse_config(C::FAMILY, config)?)?))
    }

    /// The encoder's output (n × tokens × width) and named access to `params`.
    pub(crate) fn encode<'a>(
        &'a self,
        params: &'a [Tensor],
        images: &Tensor,
    ) -> Result<(Params<'a>, Tensor)> {
        let p = self.vit.params(params)?;
        let hidden = self.vit.hidden_states(&p, images, params[0].dtype())?;
        Ok((p, hidden))
    }
}

#[allow(private_bounds)] // as above
impl<C: VitFamily> Architecture for VitClassifier<C> {
    fn family(&self) -> &'static str {
        C::FAMILY
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("a configuration serialises")
    }

    fn hf_config(&self) -> serde_json::Value {
        self.config.hf_config(self.config())
    }

    fn layout(&self) -> &ParamLayout {
        &self.vit.layout
    }

    fn input(&self) -> InputSpec {
        let (given, defaults) = self.config.normalisation();
        InputSpec::Images(self.vit.image_spec(given, defaults))
    }

    fn num_classes(&self) -> usize {
        self.vit.sizes.classes
    }

    fn forward(&self, params: &[Tensor], images: &Tensor) -> Result<Tensor> {
        let (p, hidden) = self.encode(params, images)?;
        let features = self.config.head_features(&p, &hidden)?;
        self.config.head_logits(&p, &features)
    }

    fn features(&self, params: &[Tensor], images: &Tensor) -> Result<Option<Tensor>> {
        let (p, hidden) = self.encode(params, images)?;
        Ok(Some(self.config.head_features(&p, &hidden)?))
    }

    fn zero_gradient_tensors(&self) -> Vec<String> {
        self.vit.key_biases()
    }

    fn init(&self, seed: u64, device: &Device) -> Result<Vec<Tensor>> {
        self.config.init(&self.vit.layout, seed, device)
    }

    fn tape(&self, params: &[Tensor], images: &Tensor) -> Result<Option<Box<dyn tape::Tape>>> {
        if !tape::supported(params) {
            return Ok(None);
        }
        Ok(Some(match params[0].dtype() {
            DType::F64 => Box::new(VitTape::<f64, C::Head<f64>>::forward(self, params, images)?),
            _ => Box::new(VitTape::<f32, C::Head<f32>>::forward(self, params, images)?),
        }))
    }
}

/// The head's backward on slices.
pub(crate) trait VitHead<T>: Send + Sync + 'static {
    /// Writes the head's tensors' gradients into `g` (each taken once) and returns the gradient
    /// of the last layer's output (n·t × e).
    fn backward(&self, p: &[&[T]], g: &mut [&mut [T]], s: LayerShape, dlogits: &[T]) -> Vec<T>;
}

/// The forward pass of a ViT classifier on slices, kept for its backward.
struct VitTape<T, H> {
    family: &'static str,
    layout: ParamLayout,
    index: EncoderIndex,
    params: Vec<Tensor>,
    shape: LayerShape,
    /// Patches per image np, patch length cp (channels · patch²), classes k.
    np: usize,
    cp: usize,
    k: usize,
    patches: Vec<T>,
    /// The tokens before the pre-layer LayerNorm, where the family has one.
    hidden0: Option<Vec<T>>,
    layers: Vec<LayerActs<T>>,
    head: H,
    logits: Tensor,
}

impl<T: Real, H: VitHead<T>> VitTape<T, H> {
    fn forward<C: VitFamily<Head<T> = H>>(
        arch: &VitClassifier<C>,
        params: &[Tensor],
        images: &Tensor,
    ) -> Result<Self> {
        let vit = &arch.vit;
        let s = &vit.sizes;
        let (n, patches) = patch_rows::<T>(
            vit.family,
            images,
            (s.channels, s.image_size, s.patch_size),
            (params.len(), vit.layout.len()),
        )?;
        let g = vit.grid();
        let shape = LayerShape::vit(
            (n, g * g + 1),
            (s.width, s.mlp_width, s.heads),
            s.eps,
            s.activation,
        );
        let (np, cp, k) = (g * g, s.channels * s.patch_size * s.patch_size, s.classes);
        let index = vit.positions();
        let (hidden0, layers, head, logits) = with_slices::<T, _>(params, |p| {
            let e = s.width;
            let mut embeds = vec![T::zero(); n * np * e];
            let (kw, kb) = index.patch;
            let bias = kb.map(|b| p[b]);
            linear_into(
                &patches,
                p[kw],
                bias,
                false,
                (n * np, cp, e),
                (&mut embeds, e),
            );
            // [first | patches] + positions.
            let tokens = tokens(p[index.first], &embeds, p[index.position], np);
            let (hidden0, mut h) = match index.pre {
                Some((w, b)) => {
                    let h = layer_norm(&tokens, p[w], p[b], s.eps);
                    (Some(tokens), h)
                }
                None => (None, tokens),
            };
            let mut layers = Vec::with_capacity(index.layers.len());
            for l in &index.layers {
                let (acts, out) = layer_forward(p, l, shape, h);
                layers.push(acts);
                h = out;
            }
            let (head, logits) = arch.config.head_forward(&vit.index, p, h, shape);
            (hidden0, layers, head, logits)
        })?;
        Ok(Self {
            family: vit.family,
            layout: vit.layout.clone(),
            index,
            params: params.to_vec(),
            shape,
            np,
            cp,
            k,
            patches,
            hidden0,
            layers,
            head,
            logits: Tensor::from_vec(logits, (n, k), &candle_core::Device::Cpu)?,
        })
    }

    /// Writes the gradient of every parameter into `g` (each slice taken once).
    fn backward_pass(&self, p: &[&[T]], g: &mut [&mut [T]], dlogits: &[T]) {
        let (s, ix, np) = (self.shape, &self.index, self.np);
        let e = s.e;
        let mut dh = self.head.backward(p, g, s, dlogits);
        for (l, acts) in ix.layers.iter().zip(&self.layers).rev() {
            layer_backward(p, g, l, s, acts, &mut dh);
        }
        // tokens → (pre-layer LayerNorm) → h.
        if let (Some((w, b)), Some(hidden0)) = (ix.pre, &self.hidden0) {
            let mut dtokens = vec![T::zero(); s.rows() * e];
            let (dw, db) = (take(g, w), take(g, b));
            layer_norm_backward_into(hidden0, p[w], &dh, s.eps, (&mut dtokens, false), dw, db);
            dh = dtokens;
        }
        // tokens = [first | patches Kᵀ (+ b)] + positions.
        let (dfirst, dposition) = (take(g, ix.first), take(g, ix.position));
        let dembeds = tokens_backward(&dh, dfirst, dposition, np);
        let (kw, kb) = ix.patch;
        let dkw = take(g, kw);
        let dkb = kb.map(|b| take(g, b));
        linear_backward_into(
            &self.patches,
            p[kw],
            (&dembeds, e),
            (s.n * np, self.cp, e),
            None,
            dkw,
            dkb,
        );
    }
}

impl<T: Real, H: VitHead<T>> tape::Tape for VitTape<T, H> {
    fn logits(&self) -> &Tensor {
        &self.logits
    }

    fn backward(self: Box<Self>, dlogits: &Tensor) -> Result<Vec<Tensor>> {
        let dims = (self.shape.n, self.k);
        backward_with(
            self.family,
            &self.layout,
            &self.params,
            dims,
            dlogits,
            |p, g, dl| self.backward_pass(p, g, dl),
        )
    }
}

/// Checks what every ViT configuration needs, with errors naming the family: `hidden_act` the
/// activation soup implements for it, every size of `s` and of `named` (the family's own, by
/// their config keys) positive and below 2^20 (beyond what a real model reaches, where the
/// layout's arithmetic would overflow), the patches tiling the image, LayerNorm's ε positive, the
/// heads dividing the width, one mean and standard deviation per channel.
pub(crate) fn validate(
    family: &str,
    (s, hidden_act): (&VitSizes, &str),
    named: &[(&str, usize)],
    given: &Normalisation,
) -> Result<()> {
    let err = |d: String| Err(ModelError::config(family, d));
    let act = s.activation.name();
    if hidden_act != act {
        return err(format!("only hidden_act = {act} is supported"));
    }
    let sizes = [
        ("num_channels", s.channels),
        ("image_size", s.image_size),
        ("patch_size", s.patch_size),
        ("hidden_size", s.width),
        ("the MLP width", s.mlp_width),
        ("num_hidden_layers", s.layers),
        ("num_attention_heads", s.heads),
        ("num_classes", s.classes),
    ];
    for &(name, v) in sizes.iter().chain(named) {
        if v == 0 {
            return err(format!("{name} must be positive"));
        }
        if v > 1 << 20 {
            return err(format!("{name} = {v} is beyond 2^20: not a real model"));
        }
    }
    if !s.image_size.is_multiple_of(s.patch_size) {
        return err("image_size must be a multiple of patch_size".into());
    }
    if !(s.eps.is_finite() && s.eps > 0.0) {
        return err("layer_norm_eps must be a positive number".into());
    }
    if !s.width.is_multiple_of(s.heads) {
        return err("hidden_size must be a multiple of num_attention_heads".into());
    }
    for v in [&given.image_mean, &given.image_std].into_iter().flatten() {
        if v.len() != s.channels {
            return err("image_mean and image_std need one entry per channel".into());
        }
    }
    Ok(())
}
