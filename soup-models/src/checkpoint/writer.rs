//! Writing checkpoints: safetensors files and Hugging Face model directories, each file written
//! atomically (a temporary file renamed into place) with soup's provenance metadata.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use soup_core::ParamLayout;

use super::{META_ARCH, META_CONFIG};
use crate::arch::Architecture;
use crate::error::{ModelError, Result};

/// Writes `tensors` (named as `layout`) to the safetensors file `path` atomically, with
/// `metadata` plus `format = pt` (which `transformers` requires) in the header.
pub fn write_safetensors(
    path: &Path,
    layout: &ParamLayout,
    tensors: &[Tensor],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    if layout.tensors.len() != tensors.len() {
        return Err(ModelError::format(
            path,
            format!(
                "{} tensors for a layout of {}",
                tensors.len(),
                layout.tensors.len()
            ),
        ));
    }
    let mut meta = metadata.clone();
    meta.insert("format".into(), "pt".into());
    // Tensors on a GPU are copied to the host first (a no-op for CPU tensors).
    let tensors: Vec<Tensor> = tensors
        .iter()
        .map(|t| Ok(t.to_device(&candle_core::Device::Cpu)?.contiguous()?))
        .collect::<Result<_>>()?;
    let header = safetensors_header(&layout.tensors, &tensors, &meta)
        .map_err(|e| ModelError::format(path, e))?;
    atomic_write(path, |tmp| {
        use std::io::Write;
        let file = File::create(tmp).map_err(|e| ModelError::io(tmp, e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&header).map_err(|e| ModelError::io(tmp, e))?;
        for t in &tensors {
            out.write_all(&safetensors::View::data(t))
                .map_err(|e| ModelError::io(tmp, e))?;
        }
        out.flush().map_err(|e| ModelError::io(tmp, e))
    })
}

/// The header of a safetensors file (length prefix included) for `tensors` in `specs` order,
/// deterministic: metadata keys sorted, data offsets in order, padded with spaces to a multiple
/// of 8 bytes as the safetensors library pads. The same tensors and metadata give the same bytes.
fn safetensors_header(
    specs: &[soup_core::TensorSpec],
    tensors: &[Tensor],
    metadata: &BTreeMap<String, String>,
) -> std::result::Result<Vec<u8>, String> {
    let mut header = String::from("{\"__metadata__\":");
    header.push_str(&serde_json::to_string(metadata).map_err(|e| e.to_string())?);
    let mut offset = 0usize;
    for (spec, t) in specs.iter().zip(tensors) {
        // safetensors' own name of the type ("F32", "I64", ...), as its library writes it.
        let dtype =
            serde_json::to_string(&safetensors::View::dtype(t)).map_err(|e| e.to_string())?;
        let len = t.elem_count() * t.dtype().size_in_bytes();
        header.push_str(&format!(
            ",{}:{{\"dtype\":{dtype},\"shape\":{},\"data_offsets\":[{offset},{}]}}",
            serde_json::to_string(&spec.name).map_err(|e| e.to_string())?,
            serde_json::to_string(t.dims()).map_err(|e| e.to_string())?,
            offset + len
        ));
        offset += len;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    Ok(bytes)
}

/// The files of a model directory soup writes ([`write_model_dir`]).
pub const MODEL_DIR_FILES: &[&str] = &[
    "model.safetensors",
    "config.json",
    "preprocessor_config.json",
    "README.md",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// Writes a model directory that transformers and soup both load as it is: `model.safetensors`
/// (with the architecture in its metadata), `config.json` (for CLIP, Hugging Face's
/// CLIPVisionModelWithProjection), `preprocessor_config.json` (the image processor that prepares
/// its inputs) and the model card `card` as `README.md`. Every file is written atomically.
pub fn write_model_dir(
    dir: &Path,
    arch: &dyn Architecture,
    tensors: &[Tensor],
    metadata: &BTreeMap<String, String>,
    card: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut meta = arch_metadata(arch);
    meta.extend(metadata.clone());
    write_safetensors(
        &dir.join("model.safetensors"),
        arch.layout(),
        tensors,
        &meta,
    )?;
    let files = [
        ("config.json", Some(hf_config_text(arch))),
        ("preprocessor_config.json", hf_preprocessor_text(arch)),
        ("README.md", Some(card.to_string())),
    ];
    for (name, text) in files.into_iter().filter_map(|(n, t)| Some((n, t?))) {
        let path = dir.join(name);
        atomic_write(&path, |tmp| {
            std::fs::write(tmp, &text).map_err(|e| ModelError::io(&path, e))
        })?;
    }
    Ok(())
}

/// The files of a language model's tokenizer in a Hugging Face model directory.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Copies the tokenizer files ([`TOKENIZER_FILES`]) that `from` holds into `to`, each atomically;
/// returns their names.
pub fn copy_tokenizer(from: &Path, to: &Path) -> Result<Vec<&'static str>> {
    let mut copied = Vec::new();
    for &name in TOKENIZER_FILES {
        let src = from.join(name);
        if !src.is_file() {
            continue;
        }
        let bytes = std::fs::read(&src).map_err(|e| ModelError::io(&src, e))?;
        let dst = to.join(name);
        atomic_write(&dst, |tmp| {
            std::fs::write(tmp, &bytes).map_err(|e| ModelError::io(&dst, e))
        })?;
        copied.push(name);
    }
    Ok(copied)
}

/// The `config.json` of a model directory of `arch` ([`Architecture::hf_config`]): for CLIP,
/// transformers' CLIPVisionModelWithProjection; for DINOv2, Dinov2ForImageClassification.
pub fn hf_config_text(arch: &dyn Architecture) -> String {
    serde_json::to_string_pretty(&arch.hf_config()).expect("JSON values serialise")
}

/// The `preprocessor_config.json` of a model directory of `arch`: Hugging Face's
/// `CLIPImageProcessor` settings for CLIP's preprocessing (bicubic resize of the shorter side,
/// centre crop, the model's mean and standard deviation), which soup's `--preprocess clip` equals;
/// `None` for a model that does not read images.
pub fn hf_preprocessor_text(arch: &dyn Architecture) -> Option<String> {
    let input = arch.image_input().ok()?;
    // f32 values as their shortest decimals (0.48145466, not 0.48145467042922974).
    let decimal = |v: &[f32]| -> Vec<f64> {
        v.iter()
            .map(|x| x.to_string().parse().expect("a float's decimal parses"))
            .collect()
    };
    let config = serde_json::json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true,
        "size": {"shortest_edge": input.height},
        "resample": 3,
        "do_center_crop": true,
        "crop_size": {"height": input.height, "width": input.width},
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": decimal(&input.mean),
        "image_std": decimal(&input.std),
        "do_convert_rgb": input.channels == 3,
    });
    Some(serde_json::to_string_pretty(&config).expect("JSON values serialise"))
}

/// The metadata that lets [`Checkpoint::architecture`] rebuild `arch`.
pub fn arch_metadata(arch: &dyn Architecture) -> BTreeMap<String, String> {
    BTreeMap::from([
        (META_ARCH.to_string(), arch.family().to_string()),
        (META_CONFIG.to_string(), arch.config().to_string()),
    ])
}

/// Runs `write` on a temporary file next to `path`, syncs it and renames it to `path`; on any
/// error the temporary file is removed and `path` is untouched.
pub fn atomic_write(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| ModelError::format(path, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = write(&tmp).and_then(|()| {
        crate::crash::disk_full().map_err(|e| ModelError::io(path, e))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| ModelError::io(path, e))?;
        crate::crash::point("atomic_write: temporary file written");
        std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))?;
        sync_dir(&dir);
        crate::crash::point("atomic_write: renamed into place");
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Makes a rename or removal in `dir` durable (best effort: not every file system can sync a
/// directory).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
