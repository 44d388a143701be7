//! The idx(.gz) files of MNIST and Fashion-MNIST, and the CIFAR-10/100 binary versions.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::RawImages;
use crate::error::{ModelError, Result};

/// Reads a file, gunzipping it when it ends in `.gz`; `name` is tried with and without `.gz`.
pub(crate) fn read_maybe_gz(root: &Path, name: &str) -> Result<(PathBuf, Vec<u8>)> {
    let gz = root.join(format!("{name}.gz"));
    let plain = root.join(name);
    let (path, zipped) = if gz.exists() {
        (gz, true)
    } else {
        (plain, false)
    };
    let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
    if !zipped {
        return Ok((path, bytes));
    }
    // Deflate expands at most 1032:1: more output than that is not a gzip stream of this file.
    let limit = (bytes.len() as u64)
        .saturating_mul(1032)
        .saturating_add(1024);
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| ModelError::format(&path, format!("bad gzip data: {e}")))?;
    if out.len() as u64 > limit {
        return Err(ModelError::format(
            &path,
            "gzip data expands beyond what deflate can: not a gzip file",
        ));
    }
    Ok((path, out))
}

pub(crate) fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The idx files of one split: images (magic 0x803: n, rows, cols) and labels (magic 0x801: n).
pub(crate) fn read_idx_split(root: &Path, test: bool) -> Result<RawImages> {
    let prefix = if test { "t10k" } else { "train" };
    let (ipath, images) = read_maybe_gz(root, &format!("{prefix}-images-idx3-ubyte"))?;
    let (lpath, labels) = read_maybe_gz(root, &format!("{prefix}-labels-idx1-ubyte"))?;
    if images.len() < 16 || be_u32(&images, 0) != 0x803 {
        return Err(ModelError::format(
            &ipath,
            "not an idx3 image file (magic 0x803)",
        ));
    }
    if labels.len() < 8 || be_u32(&labels, 0) != 0x801 {
        return Err(ModelError::format(
            &lpath,
            "not an idx1 label file (magic 0x801)",
        ));
    }
    let n = be_u32(&images, 4) as usize;
    let (h, w) = (be_u32(&images, 8) as usize, be_u32(&images, 12) as usize);
    if h == 0 || w == 0 {
        return Err(ModelError::format(
            &ipath,
            format!("images of {h} × {w} pixels"),
        ));
    }
    let promised = n
        .checked_mul(h)
        .and_then(|v| v.checked_mul(w))
        .and_then(|v| v.checked_add(16));
    if promised != Some(images.len()) {
        return Err(ModelError::format(
            &ipath,
            format!(
                "{} bytes, the header promises {n} images of {h} × {w} pixels",
                images.len()
            ),
        ));
    }
    if be_u32(&labels, 4) as usize != n || labels.len() != 8 + n {
        return Err(ModelError::format(
            &lpath,
            format!("labels do not match the {n} images"),
        ));
    }
    let labels: Vec<u32> = labels[8..].iter().map(|&l| l as u32).collect();
    let num_classes = labels.iter().max().map_or(0, |&m| m as usize + 1);
    Ok(RawImages {
        channels: 1,
        height: h,
        width: w,
        pixels: images[16..].to_vec(),
        labels,
        num_classes,
    })
}

/// CIFAR binary files: records of label byte(s) then 3 × 32 × 32 pixels (R, G, B planes).
pub(crate) fn read_cifar(root: &Path, test: bool, classes: usize) -> Result<RawImages> {
    let files: Vec<String> = match (classes, test) {
        (10, false) => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        (10, true) => vec!["test_batch.bin".into()],
        (_, false) => vec!["train.bin".into()],
        (_, true) => vec!["test.bin".into()],
    };
    let label_bytes = if classes == 10 { 1 } else { 2 };
    let record = label_bytes + 3072;
    let mut raw = RawImages {
        channels: 3,
        height: 32,
        width: 32,
        pixels: Vec::new(),
        labels: Vec::new(),
        num_classes: classes,
    };
    for f in files {
        let path = root.join(f);
        let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
        if bytes.len() % record != 0 {
            return Err(ModelError::format(
                &path,
                format!(
                    "{} bytes is not a whole number of {record}-byte records",
                    bytes.len()
                ),
            ));
        }
        for rec in bytes.chunks(record) {
            // CIFAR-100 records hold the coarse label, then the fine one: use the fine label.
            let label = rec[label_bytes - 1] as u32;
            if label as usize >= classes {
                return Err(ModelError::format(
                    &path,
                    format!("label {label} ≥ {classes}"),
                ));
            }
            raw.labels.push(label);
            raw.pixels.extend_from_slice(&rec[label_bytes..]);
        }
    }
    Ok(raw)
}
