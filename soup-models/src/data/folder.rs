//! ImageFolder, the ImageNet layout: `train/<class>/*.{jpg,jpeg,png}` and `val/<class>/...`
//! (or `test/`), classes in sorted order, decoded in parallel.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::preprocess::{square_rgb, Preprocess};
use super::RawImages;
use crate::error::{ModelError, Result};

/// Side of the square images ImageFolder decodes to (resized on the shorter side, then centre-
/// cropped: [`Preprocess`]), CLIP's input size; a model of another size resizes these squares.
pub const IMAGE_FOLDER_SIDE: usize = 224;

/// `train/<class>/*` or `val/<class>/*` (`test/<class>/*`), decoded in parallel to RGB, resized
/// and centre-cropped to [`IMAGE_FOLDER_SIDE`] as `preprocess` says.
pub(crate) fn read_image_folder(
    root: &Path,
    test: bool,
    preprocess: Preprocess,
) -> Result<RawImages> {
    let (files, num_classes) = list_image_folder(root, test)?;
    let side = IMAGE_FOLDER_SIDE;
    let decoded: Vec<Vec<u8>> = files
        .par_iter()
        .map(|(path, _)| {
            let img = decode_image(path)?;
            Ok(square_rgb(&img.to_rgb8(), side, preprocess))
        })
        .collect::<Result<_>>()?;
    Ok(RawImages {
        channels: 3,
        height: side,
        width: side,
        pixels: decoded.concat(),
        labels: files.iter().map(|(_, l)| *l).collect(),
        num_classes,
    })
}

/// The image files of an ImageFolder split, sorted by class then name, with their labels, and
/// the number of classes (the folders of `train/`).
pub(crate) fn list_image_folder(root: &Path, test: bool) -> Result<(Vec<(PathBuf, u32)>, usize)> {
    let classes = list_dirs(&root.join("train"))?;
    let dir = if !test {
        root.join("train")
    } else if root.join("val").is_dir() {
        root.join("val")
    } else {
        root.join("test")
    };
    let mut files = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let class_dir = dir.join(class);
        if !class_dir.is_dir() {
            continue;
        }
        let mut names: Vec<PathBuf> = std::fs::read_dir(&class_dir)
            .map_err(|e| ModelError::io(&class_dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
                matches!(ext.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png")
            })
            .collect();
        names.sort();
        files.extend(names.into_iter().map(|p| (p, label as u32)));
    }
    Ok((files, classes.len()))
}

/// The most bytes one image may decode to (8192 × 8192 RGBA; ImageNet's largest is far below):
/// an image file is small, its declared size is not, so the decoder is held to this.
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// Decodes the image at `path` within [`MAX_IMAGE_BYTES`] and 16384 pixels per side.
pub fn decode_image(path: &Path) -> Result<image::DynamicImage> {
    let bad = |e: image::ImageError| ModelError::format(path, format!("cannot decode image: {e}"));
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| ModelError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| ModelError::io(path, e))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(1 << 14);
    limits.max_image_height = Some(1 << 14);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    reader.limits(limits);
    reader.decode().map_err(bad)
}

pub(crate) fn list_dirs(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}
