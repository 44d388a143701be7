//! PyTorch checkpoints (`torch.save` zip archives of a state dict), read through candle's pickle
//! reader, and the OpenAI-CLIP layout that model-soups and the MEHL-Soup authors publish:
//! `model.visual.*` (or `visual.*`) with fused attention projections, plus `classification_head.*`.

use std::collections::BTreeMap;

use std::path::Path;

use candle_core::Tensor;

use crate::arch::clip::{clip_tensors, ClipVitConfig};
use crate::error::{ModelError, Result};

pub use crate::arch::clip::Origin;

impl Origin {
    pub fn name(&self) -> &str {
        match self {
            Origin::Same(n) | Origin::Transposed(n) | Origin::Rows { name: n, .. } => n,
        }
    }

    /// The shape of the derived tensor, given the stored one.
    pub fn shape(&self, stored: &[usize]) -> Vec<usize> {
        match self {
            Origin::Same(_) => stored.to_vec(),
            Origin::Rows { parts, .. } => {
                let mut s = stored.to_vec();
                s[0] /= parts;
                s
            }
            Origin::Transposed(_) => stored.iter().rev().copied().collect(),
        }
    }

    /// The derived tensor from the stored one.
    pub fn apply(&self, stored: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Origin::Same(_) => Ok(stored),
            Origin::Rows { part, parts, .. } => {
                let n = stored.dim(0)? / parts;
                stored.narrow(0, part * n, n)?.contiguous()
            }
            Origin::Transposed(_) => stored.t()?.contiguous(),
        }
    }
}

/// The prefix of an OpenAI-CLIP visual tower in a state dict (`model.visual.`, `visual.`), if any.
pub fn openai_prefix<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<String> {
    names
        .into_iter()
        .find_map(|n| n.strip_suffix("class_embedding"))
        .filter(|p| p.ends_with("visual."))
        .map(str::to_string)
}

/// Number of residual blocks of the OpenAI visual tower under `prefix`.
pub fn openai_layers<'a>(prefix: &str, names: impl IntoIterator<Item = &'a str>) -> usize {
    let blocks = format!("{prefix}transformer.resblocks.");
    names
        .into_iter()
        .filter_map(|n| {
            n.strip_prefix(&blocks)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// Hugging Face name → OpenAI origin, for a tower of `layers` blocks under `prefix` (CLIP's
/// one table of names, [`clip_tensors`]).
pub fn openai_mapping(prefix: &str, layers: usize) -> BTreeMap<String, Origin> {
    clip_tensors(layers, prefix)
        .into_iter()
        .map(|t| (t.hf, t.openai))
        .collect()
}

/// The configuration of an OpenAI visual tower, read off its shapes as OpenAI's `build_model`
/// does (heads = width / 64, at least 1). `shape` gives a stored tensor's shape.
pub fn openai_config(
    prefix: &str,
    layers: usize,
    shape: impl Fn(&str) -> Result<Vec<usize>>,
) -> Result<ClipVitConfig> {
    // Each tensor with the rank the layout has, so a lying file is an error, not an index panic.
    let dims = |name: &str, rank: usize| -> Result<Vec<usize>> {
        let s = shape(name)?;
        if s.len() != rank || s.contains(&0) {
            return Err(ModelError::config(
                "clip-vit",
                format!("tensor {name} has shape {s:?}, expected {rank} positive dimensions"),
            ));
        }
        Ok(s)
    };
    let conv = dims(&format!("{prefix}conv1.weight"), 4)?;
    let positions = dims(&format!("{prefix}positional_embedding"), 2)?[0];
    let proj = dims(&format!("{prefix}proj"), 2)?;
    let fc = dims(
        &format!("{prefix}transformer.resblocks.0.mlp.c_fc.weight"),
        2,
    )?;
    let head = dims("classification_head.weight", 2)?;
    if positions < 2 {
        return Err(ModelError::config(
            "clip-vit",
            format!("{prefix}positional_embedding holds {positions} positions"),
        ));
    }
    let grid = ((positions - 1) as f64).sqrt().round() as usize;
    Ok(ClipVitConfig {
        hidden_size: conv[0],
        intermediate_size: fc[0],
        num_hidden_layers: layers,
        num_attention_heads: (conv[0] / 64).max(1),
        num_channels: conv[1],
        image_size: grid * conv[2],
        patch_size: conv[2],
        projection_dim: proj[1],
        layer_norm_eps: 1e-5,
        hidden_act: "quick_gelu".into(),
        num_classes: head[0],
        normalisation: Default::default(),
    })
}

/// Checks a `torch.save` archive before candle's pickle reader sees it: every zip entry's
/// declared size within what the file can hold, and every length a pickle opcode declares
/// (strings, bytes, frames) within the pickle. A lying file is then an error here instead of a
/// huge allocation there.
pub fn check_archive(path: &Path) -> Result<()> {
    let bad =
        |d: String| ModelError::format(path, format!("not a readable PyTorch checkpoint ({d})"));
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    for i in 0..zip.len() {
        let entry = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
        let name = String::from_utf8_lossy(entry.name_raw()).into_owned();
        // Deflate expands at most 1032:1; a stored entry is no larger than the file.
        let limit = entry
            .compressed_size()
            .saturating_mul(1032)
            .min(file_len.saturating_mul(1032));
        if entry.size() > limit.max(entry.compressed_size()) {
            return Err(bad(format!(
                "entry {name} declares {} bytes from {} stored",
                entry.size(),
                entry.compressed_size()
            )));
        }
        if name.ends_with("data.pkl") {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(entry, limit + 1), &mut bytes)
                .map_err(|e| bad(format!("entry {name}: {e}")))?;
            scan_pickle(&bytes).map_err(|d| bad(format!("{name}: {d}")))?;
        }
    }
    Ok(())
}

/// Walks a pickle's opcodes, checking that every declared length fits in what remains.
fn scan_pickle(p: &[u8]) -> std::result::Result<(), String> {
    let mut i = 0usize;
    let take = |i: usize, n: usize| -> std::result::Result<&[u8], String> {
        i.checked_add(n)
            .and_then(|end| p.get(i..end))
            .ok_or_else(|| format!("truncated at byte {i}"))
    };
    let uint = |b: &[u8]| b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64);
    while i < p.len() {
        let op = p[i];
        i += 1;
        let fixed = match op {
            b'.' => return Ok(()),
            b'(' | b'0' | b'1' | b'2' | b'N' | b'Q' | b'R' | b'a' | b'b' | b'd' | b'}' | b'e'
            | b'l' | b']' | b'o' | b's' | b't' | b')' | b'u' | 0x81 | 0x85 | 0x86 | 0x87 | 0x88
            | 0x89 | 0x8f | 0x90 | 0x91 | 0x92 | 0x93 | 0x94 | 0x97 | 0x98 => Some(0),
            b'K' | b'h' | b'q' | 0x80 | 0x82 => Some(1),
            b'M' | 0x83 => Some(2),
            b'J' | b'j' | b'r' | 0x84 => Some(4),
            b'G' => Some(8),
            _ => None,
        };
        if let Some(n) = fixed {
            take(i, n)?;
            i += n;
            continue;
        }
        let prefixed = match op {
            b'U' | 0x8c | b'C' | 0x8a => Some(1),
            b'T' | b'X' | b'B' | 0x8b => Some(4),
            0x8d | 0x8e | 0x96 => Some(8),
            _ => None,
        };
        if let Some(n) = prefixed {
            let len = uint(take(i, n)?);
            i += n;
            let len = usize::try_from(len).map_err(|_| format!("length {len} at byte {i}"))?;
            if len > p.len() - i {
                return Err(format!(
                    "opcode at byte {} declares {len} bytes, {} remain",
                    i - n - 1,
                    p.len() - i
                ));
            }
            i += len;
            continue;
        }
        match op {
            // A frame announces the length of what follows; the opcodes inside are read as such.
            0x95 => {
                let len = uint(take(i, 8)?);
                i += 8;
                if len > (p.len() - i) as u64 {
                    return Err(format!("frame of {len} bytes, {} remain", p.len() - i));
                }
            }
            // Text arguments up to a newline (two for GLOBAL and INST).
            b'I' | b'L' | b'S' | b'V' | b'F' | b'P' | b'g' | b'p' | b'c' | b'i' => {
                let lines = if matches!(op, b'c' | b'i') { 2 } else { 1 };
                for _ in 0..lines {
                    let end = p[i..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or_else(|| format!("unterminated argument at byte {i}"))?;
                    i += end + 1;
                }
            }
            other => return Err(format!("unknown opcode 0x{other:02x} at byte {}", i - 1)),
        }
    }
    Err("no STOP opcode".into())
}

/// Checks that the storage of tensor `info` holds the bytes its layout declares, before candle
/// allocates them.
pub fn check_tensor_fits(path: &Path, info: &candle_core::pickle::TensorInfo) -> Result<()> {
    let bad = |d: String| ModelError::format(path, format!("tensor {}: {d}", info.name));
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    let stored = zip
        .by_name(&info.path)
        .map_err(|e| bad(e.to_string()))?
        .size();
    let needed = info
        .layout
        .start_offset()
        .checked_add(info.layout.shape().elem_count())
        .and_then(|n| n.checked_mul(info.dtype.size_in_bytes()));
    match needed {
        Some(n) if n as u64 <= stored => Ok(()),
        _ => Err(bad(format!(
            "its layout {:?} needs more than the {stored} bytes of its storage",
            info.layout.dims()
        ))),
    }
}
