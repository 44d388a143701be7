//! [`Checkpoint`]: a model on disk, read lazily. safetensors files are memory-mapped and only
//! the tensors asked for are read; `.pt` files through candle's pickle reader.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::pickle::PthTensors;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use soup_core::ParamLayout;

use super::torch::{openai_layers, openai_mapping, openai_prefix, Origin};
use crate::arch::Architecture;
use crate::error::{ModelError, Result};

/// Tensors of a checkpoint that are not part of any image classifier and are skipped: the text
/// tower and logit scale of a full CLIPModel, and the int64 `position_ids` buffers of older files.
pub(crate) fn ignored(name: &str) -> bool {
    name.starts_with("text_model.")
        || name.starts_with("text_projection.")
        || name == "logit_scale"
        || name.ends_with("position_ids")
        || name == "dinov2.embeddings.mask_token"
        || name.ends_with("rotary_emb.inv_freq")
}

#[derive(Debug)]
pub(super) struct Shard {
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
pub(super) enum Backend {
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
    pub(super) backend: Backend,
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
                    super::torch::check_tensor_fits(file, info)?;
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
    super::torch::check_archive(file)?;
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
