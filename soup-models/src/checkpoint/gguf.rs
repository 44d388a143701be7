//! GGUF files (llama.cpp's format): metadata and tensor descriptions in a header, then the tensors,
//! quantised or not. The header is walked and checked here before candle-core's reader sees it
//! (candle divides by `general.alignment` unchecked, multiplies dimensions unchecked, and decodes
//! invalid UTF-8 lossily); the tensors are then read and dequantised to f32 by
//! `candle_core::quantized`, which knows F32, F16, BF16, Q4_0 … Q8_1 and the K-quants. A type it
//! does not know is refused by its name.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};

/// ggml's tensor types by their number, and whether candle dequantises them.
const GGML_TYPES: &[(u32, &str, bool)] = &[
    (0, "F32", true),
    (1, "F16", true),
    (2, "Q4_0", true),
    (3, "Q4_1", true),
    (6, "Q5_0", true),
    (7, "Q5_1", true),
    (8, "Q8_0", true),
    (9, "Q8_1", true),
    (10, "Q2_K", true),
    (11, "Q3_K", true),
    (12, "Q4_K", true),
    (13, "Q5_K", true),
    (14, "Q6_K", true),
    (15, "Q8_K", true),
    (16, "IQ2_XXS", false),
    (17, "IQ2_XS", false),
    (18, "IQ3_XXS", false),
    (19, "IQ1_S", false),
    (20, "IQ4_NL", false),
    (21, "IQ3_S", false),
    (22, "IQ2_S", false),
    (23, "IQ4_XS", false),
    (24, "I8", false),
    (25, "I16", false),
    (26, "I32", false),
    (27, "I64", false),
    (28, "F64", false),
    (29, "IQ1_M", false),
    (30, "BF16", true),
    (34, "TQ1_0", false),
    (35, "TQ2_0", false),
    (39, "MXFP4", false),
];

/// Elements per block and bytes per block of the types candle reads.
fn block(kind: u32) -> (u64, u64) {
    match kind {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        9 => (32, 40),
        10 => (256, 84),
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        _ => unreachable!("only the types candle reads have a block size here"),
    }
}

/// The most elements a tensor may declare: far beyond any real model, far below an overflow.
const MAX_ELEMENTS: u64 = 1 << 40;

/// A GGUF file whose header has been checked, with its metadata and tensors.
pub struct Gguf {
    path: PathBuf,
    content: Content,
    /// Each tensor's ggml type name, by tensor name.
    types: HashMap<String, &'static str>,
}

impl Gguf {
    /// Opens `path` and checks its header: every error names the file and what is wrong.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |d: String| ModelError::format(path, format!("not a readable GGUF file ({d})"));
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let size = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let mut r = Header::new(BufReader::new(file), size);
        let types = r.check().map_err(bad)?;
        let mut file = r.into_inner();
        file.seek(SeekFrom::Start(0))
            .map_err(|e| ModelError::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            types,
        })
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A string of the metadata; an error naming the key when it is absent or not a string.
    pub fn string(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            _ => Err(self.missing(key, "a string")),
        }
    }

    /// An unsigned integer of the metadata.
    pub fn uint(&self, key: &str) -> Result<u64> {
        self.get(key)
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
            .ok_or_else(|| self.missing(key, "an unsigned integer"))
    }

    /// A float of the metadata.
    pub fn float(&self, key: &str) -> Result<f64> {
        self.get(key)
            .and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
            .ok_or_else(|| self.missing(key, "a number"))
    }

    /// An array of strings of the metadata.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let Some(Value::Array(values)) = self.get(key) else {
            return Err(self.missing(key, "an array of strings"));
        };
        values
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(self.missing(key, "an array of strings")),
            })
            .collect()
    }

    /// An array of integers of the metadata.
    pub fn ints(&self, key: &str) -> Result<Vec<i64>> {
        let Some(Value::Array(values)) = self.get(key) else {
            return Err(self.missing(key, "an array of integers"));
        };
        values
            .iter()
            .map(|v| {
                v.to_i32()
                    .map(i64::from)
                    .or_else(|_| v.to_u32().map(i64::from))
                    .or_else(|_| v.to_i64())
                    .map_err(|_| self.missing(key, "an array of integers"))
            })
            .collect()
    }

    fn missing(&self, key: &str, what: &str) -> ModelError {
        ModelError::format(&self.path, format!("metadata {key} is not {what}"))
    }

    /// The names of the tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    /// The shape of tensor `name` in row-major order (the reverse of ggml's `ne`).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.info(name)?.shape.dims().to_vec())
    }

    /// The ggml type of tensor `name` (`Q4_1`, `F32`, …).
    pub fn type_name(&self, name: &str) -> Result<&'static str> {
        self.info(name)?;
        Ok(self.types[name])
    }

    fn info(&self, name: &str) -> Result<&candle_core::quantized::gguf_file::TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// Tensor `name` dequantised to f32 on the CPU, in row-major order.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.info(name)?;
        let mut file = File::open(&self.path).map_err(|e| ModelError::io(&self.path, e))?;
        let q = self
            .content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| ModelError::format(&self.path, format!("tensor {name}: {e}")))?;
        Ok(q.dequantize(&Device::Cpu)?)
    }
}

/// A walk over a GGUF header that checks every length, type and string against the file.
struct Header<R> {
    r: R,
    pos: u64,
    size: u64,
    version: u32,
}

type Check<T> = std::result::Result<T, String>;

impl<R: Read + Seek> Header<R> {
    fn new(r: R, size: u64) -> Self {
        Self {
            r,
            pos: 0,
            size,
            version: 0,
        }
    }

    fn into_inner(self) -> R {
        self.r
    }

    fn bytes(&mut self, n: u64) -> Check<Vec<u8>> {
        if n > self.size.saturating_sub(self.pos) {
            return Err(format!(
                "{n} bytes at offset {}, beyond the end of the file ({} bytes)",
                self.pos, self.size
            ));
        }
        let mut v = vec![0u8; n as usize];
        self.r.read_exact(&mut v).map_err(|e| e.to_string())?;
        self.pos += n;
        Ok(v)
    }

    fn u32(&mut self) -> Check<u32> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Check<u64> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self) -> Check<String> {
        let n = self.u64()?;
        let bytes = self.bytes(n)?;
        String::from_utf8(bytes)
            .map_err(|_| format!("a string at offset {} is not UTF-8", self.pos - n))
    }

    /// A value of type `kind`; `key` for errors. Returns it when it is an integer (for
    /// `general.alignment`).
    fn value(&mut self, kind: u32, key: &str, depth: usize) -> Check<Option<u64>> {
        let width = |k: u32| match k {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        match kind {
            8 => self.string().map(|_| None),
            9 if depth == 0 => {
                let inner = self.u32()?;
                let n = self.u64()?;
                if let Some(w) = width(inner) {
                    self.bytes(n.saturating_mul(w))?;
                    return Ok(None);
                }
                if !matches!(inner, 8 | 9) {
                    return Err(format!("metadata {key}: unknown value type {inner}"));
                }
                if n > self.size.saturating_sub(self.pos) / 8 {
                    return Err(format!(
                        "metadata {key}: {n} elements cannot fit in the file"
                    ));
                }
                for _ in 0..n {
                    self.value(inner, key, depth + 1)?;
                }
                Ok(None)
            }
            9 => Err(format!("metadata {key}: arrays nested more than once")),
            k => match width(k) {
                Some(w) => {
                    let b = self.bytes(w)?;
                    let mut v = [0u8; 8];
                    v[..b.len()].copy_from_slice(&b);
                    Ok(matches!(k, 0 | 2 | 4 | 10).then(|| u64::from_le_bytes(v)))
                }
                None => Err(format!("metadata {key}: unknown value type {k}")),
            },
        }
    }

    /// Checks the whole header; returns each tensor's type name.
    fn check(&mut self) -> Check<HashMap<String, &'static str>> {
        if self.bytes(4)? != b"GGUF" {
            return Err("no GGUF magic".into());
        }
        self.version = self.u32()?;
        if !matches!(self.version, 2 | 3) {
            return Err(format!(
                "GGUF version {} (soup reads 2 and 3)",
                self.version
            ));
        }
        let tensors = self.u64()?;
        let kvs = self.u64()?;
        let room = self.size.saturating_sub(self.pos);
        if tensors > room / 24 || kvs > room / 13 {
            return Err(format!(
                "{tensors} tensors and {kvs} metadata entries cannot fit in the file"
            ));
        }
        let mut alignment = 32;
        for _ in 0..kvs {
            let key = self.string()?;
            let kind = self.u32()?;
            let value = self.value(kind, &key, 0)?;
            if key == "general.alignment" {
                match value {
                    Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 16 => alignment = a,
                    _ => return Err("general.alignment is not a power of two".into()),
                }
            }
        }
        let mut infos = Vec::new();
        let mut types = HashMap::new();
        for _ in 0..tensors {
            let name = self.string()?;
            let dims = self.u32()?;
            if dims == 0 || dims > 4 {
                return Err(format!("tensor {name} has {dims} dimensions"));
            }
            let mut elements: u64 = 1;
            for _ in 0..dims {
                let d = self.u64()?;
                elements = elements
                    .checked_mul(d)
                    .filter(|&e| e > 0 && e <= MAX_ELEMENTS)
                    .ok_or_else(|| format!("tensor {name} has an impossible shape"))?;
            }
            let kind = self.u32()?;
            let offset = self.u64()?;
            let (type_name, known) = GGML_TYPES
                .iter()
                .find(|t| t.0 == kind)
                .map(|t| (t.1, t.2))
                .ok_or_else(|| format!("tensor {name} has unknown ggml type {kind}"))?;
            if !known {
                return Err(format!(
                    "tensor {name} is of type {type_name}, which soup does not read"
                ));
            }
            let (per_block, block_bytes) = block(kind);
            if !elements.is_multiple_of(per_block) {
                return Err(format!(
                    "tensor {name}: {elements} elements do not fill {type_name} blocks"
                ));
            }
            infos.push((name.clone(), offset, elements / per_block * block_bytes));
            types.insert(name, type_name);
        }
        let data = self.pos.div_ceil(alignment) * alignment;
        for (name, offset, bytes) in infos {
            let end = data.checked_add(offset).and_then(|s| s.checked_add(bytes));
            if end.is_none_or(|e| e > self.size) {
                return Err(format!(
                    "tensor {name} ({bytes} bytes at offset {offset}) lies beyond the end of the file"
                ));
            }
        }
        Ok(types)
    }
}
