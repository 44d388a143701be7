//! A `torch.save` writer for tests: state dicts as PyTorch writes them, so the `.pt` reader is
//! exercised without PyTorch.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};

use std::collections::BTreeMap;

use crate::checkpoint::torch::{openai_mapping, Origin};
use crate::error::{ModelError, Result};

/// Writes `tensors` (f32) as `torch.save` writes a state dict: a zip archive with
/// `archive/data.pkl` (an OrderedDict of `torch._utils._rebuild_tensor_v2` calls, pickle
/// protocol 2), one `archive/data/<key>` file per storage, and `archive/version`.
pub fn write_torch_state_dict(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let io = |e: std::io::Error| ModelError::io(path, e);
    let zip_err = |e: zip::result::ZipError| ModelError::format(path, e);
    let mut pkl = Pickle::default();
    pkl.bytes.extend([0x80, 2]);
    pkl.global("collections", "OrderedDict");
    pkl.bytes.extend([b')', b'R', b'(']);
    for (key, (name, t)) in tensors.iter().enumerate() {
        pkl.unicode(name);
        pkl.global("torch._utils", "_rebuild_tensor_v2");
        pkl.bytes.push(b'(');
        pkl.bytes.push(b'(');
        pkl.unicode("storage");
        pkl.global("torch", "FloatStorage");
        pkl.unicode(&key.to_string());
        pkl.unicode("cpu");
        pkl.int(t.elem_count());
        pkl.bytes.extend([b't', b'Q']);
        pkl.int(0);
        pkl.ints(t.dims());
        let mut strides = vec![1usize; t.rank()];
        for d in (0..t.rank().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * t.dims()[d + 1];
        }
        pkl.ints(&strides);
        pkl.bytes.push(0x89);
        pkl.global("collections", "OrderedDict");
        pkl.bytes.extend([b')', b'R', b't', b'R']);
    }
    pkl.bytes.extend([b'u', b'.']);

    let file = std::fs::File::create(path).map_err(io)?;
    let mut zip = zip::ZipWriter::new(file);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options)
        .map_err(zip_err)?;
    zip.write_all(&pkl.bytes).map_err(io)?;
    for (key, (_, t)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{key}"), options)
            .map_err(zip_err)?;
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        zip.write_all(&bytes).map_err(io)?;
    }
    zip.start_file("archive/version", options)
        .map_err(zip_err)?;
    zip.write_all(b"3\n").map_err(io)?;
    zip.finish().map_err(zip_err)?;
    Ok(())
}

/// The few pickle opcodes a state dict needs.
#[derive(Default)]
struct Pickle {
    bytes: Vec<u8>,
}

impl Pickle {
    fn global(&mut self, module: &str, name: &str) {
        self.bytes.push(b'c');
        self.bytes.extend(format!("{module}\n{name}\n").as_bytes());
    }

    fn unicode(&mut self, s: &str) {
        self.bytes.push(b'X');
        self.bytes.extend((s.len() as u32).to_le_bytes());
        self.bytes.extend(s.as_bytes());
    }

    fn int(&mut self, v: usize) {
        self.bytes.push(b'J');
        self.bytes.extend((v as i32).to_le_bytes());
    }

    fn ints(&mut self, vs: &[usize]) {
        self.bytes.push(b'(');
        for &v in vs {
            self.int(v);
        }
        self.bytes.push(b't');
    }
}

/// The OpenAI state dict of a Hugging Face-named CLIP classifier (the inverse of
/// [`openai_mapping`]): q, k, v fused into `in_proj_*`, the projection transposed.
pub fn to_openai(
    prefix: &str,
    layers: usize,
    named: &BTreeMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let mut fused: BTreeMap<String, Vec<(usize, Tensor)>> = BTreeMap::new();
    let mut out = Vec::new();
    for (hf, source) in openai_mapping(prefix, layers) {
        let t = named
            .get(&hf)
            .ok_or_else(|| ModelError::config("clip-vit", format!("no tensor {hf}")))?;
        match source {
            Origin::Same(n) => out.push((n, t.clone())),
            Origin::Transposed(n) => out.push((n, t.t()?.contiguous()?)),
            Origin::Rows { name, part, .. } => {
                fused.entry(name).or_default().push((part, t.clone()))
            }
        }
    }
    for (name, mut parts) in fused {
        parts.sort_by_key(|(p, _)| *p);
        let parts: Vec<Tensor> = parts.into_iter().map(|(_, t)| t).collect();
        out.push((name, Tensor::cat(&parts, 0)?));
    }
    Ok(out)
}
