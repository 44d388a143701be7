//! `llama`: decoder-only language models as transformers' `LlamaForCausalLM` computes them, with
//! its tensor names and configuration: token embeddings, pre-norm layers
//! x += Attn(RMSNorm₁(x)), x += MLP(RMSNorm₂(x)) with causal grouped-query attention under rotary
//! positions and the SwiGLU MLP down(silu(gate(x)) ⊙ up(x)), a final RMSNorm, and a head tied to
//! the embeddings or of its own. The families accepted: `llama` (`attention_bias` puts a bias on
//! q, k, v and o; `mlp_bias` on the MLP's three projections) and `qwen2` (biases on q, k and v
//! only). A `rope_scaling` other than the default is refused by name, as are other families.
//! Training runs the hand-written pass of `llama/tape.rs` on the CPU.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use soup_core::rng::SplitMix64;
use soup_core::{ParamLayout, TensorSpec};

use super::{filled, index_of, normal, parse_config, Architecture, InputSpec, Params, TokenSpec};
use crate::error::{ModelError, Result};
use crate::ops::{linear, softmax};

mod tape;

const FAMILY: &str = "llama";

/// The configuration, with the keys of transformers' `LlamaConfig` soup reads, and the family
/// (`llama` or `qwen2`) that says where the biases are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Key/value heads of grouped-query attention (`num_attention_heads` when absent).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// The width of a head (`hidden_size / num_attention_heads` when absent).
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// θ of the rotary positions: the frequency of pair i is θ^(−2i/head_dim).
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// Reads a Hugging Face `config.json` of a `llama` or `qwen2` model, absent keys taking
    /// transformers' defaults. θ is read from `rope_theta`, or from `rope_parameters` as
    /// transformers 5 writes it; a RoPE scaling other than the default is refused by name.
    pub fn from_hf_json(json: &serde_json::Value) -> Result<Self> {
        let err = |d: String| ModelError::config(FAMILY, d);
        let top = json
            .as_object()
            .ok_or_else(|| err("config.json is not an object".into()))?;
        let model_type = top.get("model_type").and_then(|v| v.as_str());
        let model_type = match model_type {
            Some(t @ ("llama" | "qwen2")) => t,
            Some(t) => {
                return Err(err(format!(
                    "model_type {t:?} is not supported (llama, qwen2)"
                )))
            }
            None => "llama",
        };
        let rope = top
            .get("rope_parameters")
            .or_else(|| top.get("rope_scaling"));
        let mut theta = top.get("rope_theta").cloned();
        if let Some(rope) = rope.filter(|r| !r.is_null()) {
            let kind = rope
                .get("rope_type")
                .or_else(|| rope.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            if kind != "default" {
                return Err(err(format!(
                    "rope scaling {kind:?} is not supported (only the default rotary positions)"
                )));
            }
            theta = theta.or_else(|| rope.get("rope_theta").cloned());
        }
        if top.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
            return Err(err("use_sliding_window = true is not supported".into()));
        }
        let mut v = top.clone();
        v.insert("model_type".into(), model_type.into());
        if let Some(theta) = theta {
            v.insert("rope_theta".into(), theta);
        }
        // Qwen2 has biases on q, k and v whatever its config says: record them as `llama` would.
        if model_type == "qwen2" {
            v.insert("attention_bias".into(), true.into());
        }
        for key in ["num_key_value_heads", "head_dim"] {
            if v.get(key).is_some_and(|x| x.is_null()) {
                v.remove(key);
            }
        }
        let keep: Vec<&str> = vec![
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rms_norm_eps",
            "rope_theta",
            "max_position_embeddings",
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
            "hidden_act",
        ];
        v.retain(|k, _| keep.contains(&k.as_str()));
        let config: Self = parse_config(FAMILY, &serde_json::Value::Object(v))?;
        config.validate()?;
        Ok(config)
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The width of a head.
    pub fn head_width(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether o_proj has a bias (q, k and v have one when `attention_bias`).
    fn output_bias(&self) -> bool {
        self.attention_bias && self.model_type == "llama"
    }

    fn validate(&self) -> Result<()> {
        let err = |d: String| Err(ModelError::config(FAMILY, d));
        if self.hidden_act != "silu" {
            return err(format!(
                "hidden_act = {:?} is not supported (only silu)",
                self.hidden_act
            ));
        }
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in sizes {
            if v == 0 {
                return err(format!("{name} must be positive"));
            }
            if v > 1 << 24 {
                return err(format!("{name} = {v} is beyond 2^24: not a real model"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let d = self.head_width();
        if d == 0 || d % 2 == 1 || d > 1 << 16 {
            return err(format!("head_dim {d} must be even and positive"));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return err("rms_norm_eps must be a positive number".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return err("rope_theta must be a number above 1".into());
        }
        Ok(())
    }
}

/// A Llama-family causal language model.
#[derive(Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    layout: ParamLayout,
    index: HashMap<String, usize>,
}

impl Llama {
    pub fn new(config: LlamaConfig) -> Result<Self> {
        config.validate()?;
        let layout = llama_layout(&config);
        Ok(Self {
            index: index_of(&layout),
            layout,
            config,
        })
    }

    pub fn from_config(config: &serde_json::Value) -> Result<Arc<dyn Architecture>> {
        Ok(Arc::new(Self::new(parse_config(FAMILY, config)?)?))
    }

    /// The final hidden states after the last RMSNorm (n × t × hidden): transformers'
    /// `LlamaModel(...).last_hidden_state`.
    pub fn last_hidden_state(&self, params: &[Tensor], tokens: &Tensor) -> Result<Tensor> {
        let p = Params::new(FAMILY, &self.layout, &self.index, params)?;
        let c = &self.config;
        let (n, t) = tokens.dims2()?;
        self.check_tokens(tokens, t)?;
        let dtype = params[0].dtype();
        let device = params[0].device();
        let (e, h, kv, d) = (
            c.hidden_size,
            c.num_attention_heads,
            c.kv_heads(),
            c.head_width(),
        );
        let ids = tokens
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_device(device)?;
        let mut x = p
            .get("model.embed_tokens.weight")
            .index_select(&ids, 0)?
            .reshape((n, t, e))?;
        let (cos, sin) = rotary(c, t, dtype, device)?;
        let mask = causal_mask(t, dtype, device)?;
        let scale = (d as f64).powf(-0.5);
        let lin = |x: &Tensor, name: &str, bias: bool| {
            let b = format!("{name}.bias");
            linear(x, p.get(&format!("{name}.weight")), bias.then(|| p.get(&b)))
        };
        for i in 0..c.num_hidden_layers {
            let l = format!("model.layers.{i}");
            let a = rms_norm(
                &x,
                p.get(&format!("{l}.input_layernorm.weight")),
                c.rms_norm_eps,
            )?;
            let heads = |name: &str, count: usize| -> Result<Tensor> {
                let y = lin(&a, &format!("{l}.self_attn.{name}"), c.attention_bias)?;
                Ok(y.reshape((n, t, count, d))?.transpose(1, 2)?.contiguous()?)
            };
            let q = rope(&heads("q_proj", h)?, &cos, &sin)?;
            let k = repeat_kv(&rope(&heads("k_proj", kv)?, &cos, &sin)?, h / kv)?;
            let v = repeat_kv(&heads("v_proj", kv)?, h / kv)?;
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let out = softmax(&scores)?
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((n, t, h * d))?;
            x = (x + lin(&out, &format!("{l}.self_attn.o_proj"), c.output_bias())?)?;
            let m = rms_norm(
                &x,
                p.get(&format!("{l}.post_attention_layernorm.weight")),
                c.rms_norm_eps,
            )?;
            let gate = silu(&lin(&m, &format!("{l}.mlp.gate_proj"), c.mlp_bias)?)?;
            let up = lin(&m, &format!("{l}.mlp.up_proj"), c.mlp_bias)?;
            x = (x + lin(&(gate * up)?, &format!("{l}.mlp.down_proj"), c.mlp_bias)?)?;
        }
        rms_norm(&x, p.get("model.norm.weight"), c.rms_norm_eps)
    }

    /// The head's weight: the embeddings when tied.
    fn head_name(&self) -> &'static str {
        match self.config.tie_word_embeddings {
            true => "model.embed_tokens.weight",
            false => "lm_head.weight",
        }
    }

    /// Token ids n × t, t within the positions, every id within the vocabulary.
    fn check_tokens(&self, tokens: &Tensor, t: usize) -> Result<()> {
        let c = &self.config;
        if t > c.max_position_embeddings {
            return Err(ModelError::config(
                FAMILY,
                format!(
                    "sequences of {t} tokens, beyond the model's {} positions",
                    c.max_position_embeddings
                ),
            ));
        }
        let max = tokens
            .to_dtype(DType::U32)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<u32>()? as usize;
        if max >= c.vocab_size {
            return Err(ModelError::config(
                FAMILY,
                format!(
                    "token id {max} is beyond the vocabulary of {}",
                    c.vocab_size
                ),
            ));
        }
        Ok(())
    }
}

/// RMSNorm over the last dimension, as transformers computes it: x / √(mean(x²) + ε) · w.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// x·σ(x).
fn silu(x: &Tensor) -> Result<Tensor> {
    Ok((x / (x.neg()?.exp()? + 1.0)?)?)
}

/// cos and sin of the rotary angles (t × head_dim): position j and frequency θ^(−2i/d), the d/2
/// frequencies repeated, as transformers' `LlamaRotaryEmbedding` lays them out.
fn rotary(c: &LlamaConfig, t: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let d = c.head_width();
    // In f32, as transformers computes the frequencies and angles.
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / (c.rope_theta as f32).powf(2.0 * i as f32 / d as f32))
        .collect();
    let mut angles = Vec::with_capacity(t * d);
    for j in 0..t {
        for _ in 0..2 {
            angles.extend(inv.iter().map(|f| j as f32 * f));
        }
    }
    let angles = Tensor::from_vec(angles, (t, d), device)?;
    Ok((
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ))
}

/// x·cos + rotate_half(x)·sin for x (n × heads × t × d), rotate_half(x) = [−x₂ | x₁].
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// Each of the kv heads (n × kv × t × d) repeated `times` times in place: head h of the
/// attention reads kv head h / times, as transformers' `repeat_kv`.
fn repeat_kv(x: &Tensor, times: usize) -> Result<Tensor> {
    if times == 1 {
        return Ok(x.clone());
    }
    let (n, kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((n, kv, times, t, d))?
        .contiguous()?
        .reshape((n, kv * times, t, d))?)
}

/// 0 where query i may see key j ≤ i, −∞ above the diagonal (t × t).
fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)?)
}

impl Architecture for Llama {
    fn family(&self) -> &'static str {
        FAMILY
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("LlamaConfig serialises")
    }

    /// transformers' `LlamaForCausalLM` (or `Qwen2ForCausalLM`).
    fn hf_config(&self) -> serde_json::Value {
        let mut config = self.config();
        let obj = config
            .as_object_mut()
            .expect("a struct serialises to an object");
        let architecture = match self.config.model_type.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            _ => "LlamaForCausalLM",
        };
        obj.insert("architectures".into(), serde_json::json!([architecture]));
        obj.insert("num_key_value_heads".into(), self.config.kv_heads().into());
        obj.insert("head_dim".into(), self.config.head_width().into());
        config
    }

    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn input(&self) -> InputSpec {
        InputSpec::Tokens(TokenSpec {
            vocab_size: self.config.vocab_size,
            max_positions: self.config.max_position_embeddings,
        })
    }

    fn num_classes(&self) -> usize {
        self.config.vocab_size
    }

    fn forward(&self, params: &[Tensor], tokens: &Tensor) -> Result<Tensor> {
        let hidden = self.last_hidden_state(params, tokens)?;
        let p = Params::new(FAMILY, &self.layout, &self.index, params)?;
        Ok(linear(&hidden, p.get(self.head_name()), None)?)
    }

    /// The output head when it is a tensor of its own; none when tied to the embeddings.
    fn head_tensors(&self) -> Vec<String> {
        match self.config.tie_word_embeddings {
            true => Vec::new(),
            false => vec!["lm_head.weight".into()],
        }
    }

    /// The hand-written pass (`llama/tape.rs`) for f32 or f64 tensors on the CPU.
    fn tape(
        &self,
        params: &[Tensor],
        tokens: &Tensor,
    ) -> Result<Option<Box<dyn super::tape::Tape>>> {
        if !super::tape::supported(params) {
            return Ok(None);
        }
        Params::new(FAMILY, &self.layout, &self.index, params)?;
        Ok(Some(match params[0].dtype() {
            DType::F64 => Box::new(tape::LlamaTape::<f64>::forward(self, params, tokens)?),
            _ => Box::new(tape::LlamaTape::<f32>::forward(self, params, tokens)?),
        }))
    }

    /// transformers' initialisation: weights N(0, 0.02²), biases 0, RMSNorms 1.
    fn init(&self, seed: u64, device: &Device) -> Result<Vec<Tensor>> {
        let mut rng = SplitMix64::new(seed);
        self.layout
            .tensors
            .iter()
            .map(|t| {
                let name = t.name.as_str();
                if name.ends_with("norm.weight") {
                    filled(&t.shape, 1.0, device)
                } else if name.ends_with("bias") {
                    filled(&t.shape, 0.0, device)
                } else {
                    normal(&mut rng, &t.shape, 0.02, device)
                }
            })
            .collect()
    }
}

/// The tensors of a Llama model in the order of transformers' state dict.
fn llama_layout(c: &LlamaConfig) -> ParamLayout {
    let (e, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_width(),
        c.kv_heads() * c.head_width(),
    );
    let mut t: Vec<TensorSpec> = Vec::new();
    let mut add = |name: String, shape: &[usize]| {
        t.push(TensorSpec {
            name,
            shape: shape.to_vec(),
        })
    };
    add("model.embed_tokens.weight".into(), &[v, e]);
    for i in 0..c.num_hidden_layers {
        let l = format!("model.layers.{i}");
        let projections = [
            ("self_attn.q_proj", q, e, c.attention_bias),
            ("self_attn.k_proj", kv, e, c.attention_bias),
            ("self_attn.v_proj", kv, e, c.attention_bias),
            ("self_attn.o_proj", e, q, c.output_bias()),
            ("mlp.gate_proj", f, e, c.mlp_bias),
            ("mlp.up_proj", f, e, c.mlp_bias),
            ("mlp.down_proj", e, f, c.mlp_bias),
        ];
        for (name, out, inp, bias) in projections {
            add(format!("{l}.{name}.weight"), &[out, inp]);
            if bias {
                add(format!("{l}.{name}.bias"), &[out]);
            }
        }
        add(format!("{l}.input_layernorm.weight"), &[e]);
        add(format!("{l}.post_attention_layernorm.weight"), &[e]);
    }
    add("model.norm.weight".into(), &[e]);
    if !c.tie_word_embeddings {
        add("lm_head.weight".into(), &[v, e]);
    }
    ParamLayout::new(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> serde_json::Value {
        serde_json::json!({"model_type": "llama", "vocab_size": 50, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rope_theta": 100000.0, "tie_word_embeddings": true})
    }

    #[test]
    fn smollm2_135m_has_its_published_size() {
        let c = LlamaConfig::from_hf_json(&serde_json::json!({"model_type": "llama",
            "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "rope_theta": 100000.0, "tie_word_embeddings": true, "rms_norm_eps": 1e-5}))
        .unwrap();
        assert_eq!(llama_layout(&c).numel(), 134_515_008);
    }

    #[test]
    fn unsupported_variants_are_refused_by_name() {
        assert!(LlamaConfig::from_hf_json(&tiny()).is_ok());
        for (k, v, says) in [
            (
                "rope_scaling",
                serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
                "llama3",
            ),
            (
                "rope_parameters",
                serde_json::json!({"rope_type": "yarn"}),
                "yarn",
            ),
            ("model_type", serde_json::json!("mistral"), "mistral"),
            ("num_attention_heads", serde_json::json!(3), "multiple"),
            ("num_key_value_heads", serde_json::json!(3), "multiple"),
            ("hidden_act", serde_json::json!("gelu"), "silu"),
        ] {
            let mut c = tiny();
            c[k] = v;
            let e = LlamaConfig::from_hf_json(&c).unwrap_err().to_string();
            assert!(e.contains(says), "{k}: {e}");
        }
        // The default rotary positions, however a config spells them, are accepted.
        let mut c = tiny();
        c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 5e5});
        c.as_object_mut().unwrap().remove("rope_theta");
        assert_eq!(LlamaConfig::from_hf_json(&c).unwrap().rope_theta, 5e5);
    }
}
