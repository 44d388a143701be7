//! Checkpoints: safetensors files (single or sharded with `model.safetensors.index.json`) and
//! Hugging Face model directories (`config.json` next to the weights). Files are memory-mapped and
//! only the tensors asked for are read, so a store over N files reads only the models it loads.
//! Writing is atomic (a temporary file renamed into place) and carries provenance metadata.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use soup_core::ParamLayout;

use crate::arch::{build, clip::ClipVitConfig, Architecture};
use crate::error::{ModelError, Result};

/// Metadata keys soup writes into safetensors headers.
pub const META_ARCH: &str = "soup.arch";
pub const META_CONFIG: &str = "soup.config";

/// Tensors of a checkpoint that are not part of any image classifier and are skipped: the text
/// tower and logit scale of a full CLIPModel, and the int64 `position_ids` buffers of older files.
fn ignored(name: &str) -> bool {
    name.starts_with("text_model.")
        || name.starts_with("text_projection.")
        || name == "logit_scale"
        || name.ends_with("position_ids")
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    mapped: OnceLock<std::result::Result<Mapped, String>>,
}

/// Where a tensor's bytes are in a shard, and their type and shape.
#[derive(Debug)]
struct Stored {
    dtype: Dtype,
    shape: Vec<usize>,
    offsets: (usize, usize),
}

#[derive(Debug)]
struct Mapped {
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, Stored>,
    metadata: HashMap<String, String>,
}

impl Shard {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            mapped: OnceLock::new(),
        }
    }

    /// Maps the file and parses its header (once); the error names the file.
    fn mapped(&self) -> Result<&Mapped> {
        let mapped = self.mapped.get_or_init(|| {
            let file = File::open(&self.path).map_err(|e| e.to_string())?;
            // SAFETY: the file is only read; soup never writes a checkpoint in place (writes go
            // to a temporary file that is renamed), so the mapping does not change under us.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| e.to_string())?;
            let (n, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| format!("not a valid safetensors file ({e})"))?;
            let tensors = meta
                .tensors()
                .into_iter()
                .map(|(name, info)| {
                    let stored = Stored {
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        offsets: info.data_offsets,
                    };
                    (name, stored)
                })
                .collect();
            let metadata = meta.metadata().clone().unwrap_or_default();
            Ok(Mapped {
                mmap,
                data_start: 8 + n,
                tensors,
                metadata,
            })
        });
        mapped
            .as_ref()
            .map_err(|e| ModelError::format(&self.path, e))
    }
}

/// A model on disk: where each tensor lives, and what architecture it claims.
#[derive(Debug)]
pub struct Checkpoint {
    /// The path the user gave (file or directory).
    pub path: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → shard.
    weight_map: BTreeMap<String, usize>,
    /// The Hugging Face `config.json` next to the weights, when there is one.
    pub hf_config: Option<serde_json::Value>,
}

impl Checkpoint {
    /// Opens a `.safetensors` file, a `model.safetensors.index.json`, or a directory holding
    /// either (plus an optional `config.json`). Reads headers only.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let meta = std::fs::metadata(&path).map_err(|e| ModelError::io(&path, e))?;
        let (weights, hf_config) = if meta.is_dir() {
            let config = path.join("config.json");
            let hf_config = if config.exists() {
                Some(read_json(&config)?)
            } else {
                None
            };
            let index = path.join("model.safetensors.index.json");
            let single = path.join("model.safetensors");
            let weights = if index.exists() {
                index
            } else if single.exists() {
                single
            } else {
                return Err(ModelError::format(
                    &path,
                    "no model.safetensors or model.safetensors.index.json in this directory",
                ));
            };
            (weights, hf_config)
        } else {
            (path.clone(), None)
        };
        let name = weights.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let (shards, weight_map) = if name.ends_with(".index.json") {
            open_index(&weights)?
        } else if name.ends_with(".safetensors") {
            let shard = Shard::new(weights.clone());
            let names = shard.mapped()?.tensors.keys().cloned();
            let map = names.map(|n| (n, 0)).collect();
            (vec![shard], map)
        } else {
            return Err(ModelError::format(
                &weights,
                "unknown checkpoint format (expected .safetensors, a sharded index or a model directory)",
            ));
        };
        Ok(Self {
            path,
            shards,
            weight_map,
            hf_config,
        })
    }

    /// Every tensor name in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.weight_map.keys().map(String::as_str)
    }

    /// The safetensors metadata of the first shard.
    pub fn metadata(&self) -> Result<&HashMap<String, String>> {
        Ok(&self.shards[0].mapped()?.metadata)
    }

    fn entry(&self, name: &str) -> Result<(&Shard, &Stored)> {
        let missing = || ModelError::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        };
        let shard = &self.shards[*self.weight_map.get(name).ok_or_else(missing)?];
        let info = shard.mapped()?.tensors.get(name).ok_or_else(missing)?;
        Ok((shard, info))
    }

    /// Shape and stored dtype of tensor `name`, from the header.
    pub fn info(&self, name: &str) -> Result<(Vec<usize>, Dtype)> {
        let (_, stored) = self.entry(name)?;
        Ok((stored.shape.clone(), stored.dtype))
    }

    /// Tensor `name` as f32 on `device` (f16, bf16 and f64 are converted).
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (shard, stored) = self.entry(name)?;
        let (start, end) = stored.offsets;
        let dtype = match stored.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            other => {
                return Err(ModelError::format(
                    &shard.path,
                    format!("tensor {name} has dtype {other:?}, expected a float type"),
                ))
            }
        };
        let mapped = shard.mapped()?;
        let bytes = &mapped.mmap[mapped.data_start + start..mapped.data_start + end];
        Ok(Tensor::from_raw_buffer(bytes, dtype, &stored.shape, device)?.to_dtype(DType::F32)?)
    }

    /// The architecture the checkpoint describes: soup's own metadata, else a Hugging Face CLIP
    /// `config.json` with the number of classes read off `classification_head.weight`.
    pub fn architecture(&self) -> Result<Arc<dyn Architecture>> {
        let meta = self.metadata()?;
        if let Some(family) = meta.get(META_ARCH) {
            let config = meta.get(META_CONFIG).map(String::as_str).unwrap_or("{}");
            let config: serde_json::Value = serde_json::from_str(config)
                .map_err(|e| ModelError::format(&self.path, format!("bad {META_CONFIG}: {e}")))?;
            return build(family, &config);
        }
        if let Some(json) = &self.hf_config {
            let (head, _) = self.info("classification_head.weight")?;
            return Ok(Arc::new(crate::arch::clip::ClipClassifier::new(
                ClipVitConfig::from_hf_json(json, head[0])?,
            )?));
        }
        Err(ModelError::format(
            &self.path,
            "cannot tell the architecture: no soup metadata and no config.json (pass it explicitly)",
        ))
    }

    /// The layout of this checkpoint's tensors as `arch` orders them: shapes as stored, so that
    /// models of a zoo can be compared before any is loaded. Errors name a missing tensor or one
    /// the architecture does not have.
    pub fn layout(&self, arch: &dyn Architecture) -> Result<ParamLayout> {
        let expected = arch.layout();
        for name in self.names() {
            if !ignored(name) && !expected.tensors.iter().any(|t| t.name == name) {
                return Err(ModelError::UnexpectedTensor {
                    path: self.path.clone(),
                    tensor: name.to_string(),
                    arch: arch.family().to_string(),
                });
            }
        }
        let tensors = expected
            .tensors
            .iter()
            .map(|t| {
                Ok(soup_core::TensorSpec {
                    name: t.name.clone(),
                    shape: self.info(&t.name)?.0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(ParamLayout::new(tensors))
    }

    /// The parameters of `arch`, in its layout order, as f32 on `device`; shapes are checked.
    pub fn load_params(&self, arch: &dyn Architecture, device: &Device) -> Result<Vec<Tensor>> {
        let found = self.layout(arch)?;
        found
            .tensors
            .iter()
            .zip(&arch.layout().tensors)
            .map(|(f, e)| {
                if f.shape != e.shape {
                    return Err(ModelError::Shape {
                        path: self.path.clone(),
                        tensor: e.name.clone(),
                        found: f.shape.clone(),
                        expected: e.shape.clone(),
                    });
                }
                self.load(&e.name, device)
            })
            .collect()
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::format(path, format!("bad JSON: {e}")))
}

/// A sharded checkpoint: `{"weight_map": {tensor: shard file}}`. Shards are mapped only when one
/// of their tensors is asked for.
fn open_index(index: &Path) -> Result<(Vec<Shard>, BTreeMap<String, usize>)> {
    let json = read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::format(index, "no weight_map object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| ModelError::format(index, format!("shard of {name} is not a string")))?;
        if file.contains('/') || file.contains("..") {
            return Err(ModelError::format(
                index,
                format!("shard path {file:?} leaves the directory"),
            ));
        }
        let i = match files.iter().position(|f| f == file) {
            Some(i) => i,
            None => {
                files.push(file.to_string());
                files.len() - 1
            }
        };
        weight_map.insert(name.clone(), i);
    }
    let shards = files.into_iter().map(|f| Shard::new(dir.join(f))).collect();
    Ok((shards, weight_map))
}

/// Writes `tensors` (named as `layout`) to the safetensors file `path` atomically, with
/// `metadata` plus `format = pt` (which `transformers` requires) in the header.
pub fn write_safetensors(
    path: &Path,
    layout: &ParamLayout,
    tensors: &[Tensor],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    meta.insert("format".into(), "pt".into());
    let data: Vec<(&str, Tensor)> = layout
        .tensors
        .iter()
        .zip(tensors)
        .map(|(spec, t)| Ok((spec.name.as_str(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    atomic_write(path, |tmp| {
        safetensors::tensor::serialize_to_file(data.iter().map(|(n, t)| (*n, t)), Some(meta), tmp)
            .map_err(|e| ModelError::format(path, e))
    })
}

/// Writes a model directory: `model.safetensors` (with the architecture in its metadata) and a
/// `config.json`, which for CLIP follows Hugging Face's CLIPVisionModelWithProjection so that
/// `transformers` can read the vision tower. Both files are written atomically.
pub fn write_model_dir(
    dir: &Path,
    arch: &dyn Architecture,
    tensors: &[Tensor],
    metadata: &BTreeMap<String, String>,
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
    let mut config = arch.config();
    if let (Some(obj), "clip-vit") = (config.as_object_mut(), arch.family()) {
        obj.insert(
            "architectures".into(),
            serde_json::json!(["CLIPVisionModelWithProjection"]),
        );
        obj.insert("model_type".into(), "clip_vision_model".into());
    }
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
    let path = dir.join("config.json");
    atomic_write(&path, |tmp| {
        std::fs::write(tmp, &text).map_err(|e| ModelError::io(&path, e))
    })
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
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| ModelError::io(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
