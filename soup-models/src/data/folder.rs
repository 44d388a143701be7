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
/// and centre-cropped to [`IMAGE_FOLDER_SIDE`] as `preprocess` says, labelled for a head without
/// class names ([`label_folders`]).
pub(crate) fn read_image_folder(
    root: &Path,
    test: bool,
    preprocess: Preprocess,
) -> Result<RawImages> {
    let listed = list_image_folder(root, test, &HeadClasses::default())?;
    let num_classes = listed.head_classes;
    let files = listed.files;
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

/// What an ImageFolder split's class folders are matched against: the head's class names, or
/// for a model without names, the number of its classes (either may be unknown).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadClasses {
    pub names: Option<Vec<String>>,
    pub count: Option<usize>,
}

/// An ImageFolder split, listed and labelled.
#[derive(Clone, Debug, PartialEq)]
pub struct ListedFolder {
    /// Every image, sorted by class folder then name, with its class: in the head, or among
    /// [`Self::groups`] where there are some.
    pub files: Vec<(PathBuf, u32)>,
    /// The classes scored where they are not the head's: each a group of the head's classes
    /// whose largest logit is the class's (model-soups' projection: one class each for the
    /// subset a split holds, as ImageNet-A's 200; several for ObjectNet's).
    pub groups: Option<Vec<Vec<u32>>>,
    /// Classes of the head: its count, else (a model without names, labels from train/'s
    /// folders) the number of those folders.
    pub head_classes: usize,
}

/// The split's directory: `train/`, or for evaluation `val/`, else `test/`.
fn split_dir(root: &Path, test: bool) -> Result<PathBuf> {
    if !test {
        let dir = root.join("train");
        if !dir.is_dir() {
            return Err(ModelError::format(
                root,
                "no train/ folder: this data set can only be evaluated",
            ));
        }
        return Ok(dir);
    }
    for name in ["val", "test"] {
        if root.join(name).is_dir() {
            return Ok(root.join(name));
        }
    }
    Err(ModelError::format(
        root,
        "no val/ or test/ folder to evaluate",
    ))
}

/// The head's class of each of `folders` (an ImageFolder split's class folders, sorted) and the
/// head's number of classes:
/// - a model with class names: each folder is the class of its name;
/// - the training splits of a model without names: the folders of `train/` in sorted order
///   (what `soup train` records as the names);
/// - an evaluation split of a model without names: folders named by integers are those
///   classes; else the sorted folders of `train/`, where there is one.
///
/// A folder that matches no class is an error naming it.
pub fn label_folders(
    root: &Path,
    dir: &Path,
    folders: &[String],
    head: &HeadClasses,
    test: bool,
) -> Result<(Vec<u32>, usize)> {
    let unknown = |folder: &str, what: String| {
        ModelError::format(&dir.join(folder), format!("class folder {folder:?} {what}"))
    };
    if let Some(names) = &head.names {
        let index: std::collections::HashMap<&str, u32> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as u32))
            .collect();
        let labels = folders
            .iter()
            .map(|f| {
                index.get(f.as_str()).copied().ok_or_else(|| {
                    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
                    unknown(
                        f,
                        format!(
                            "is not a class of the model ({} named classes: {}{})",
                            names.len(),
                            shown.join(", "),
                            if names.len() > 5 { ", …" } else { "" }
                        ),
                    )
                })
            })
            .collect::<Result<_>>()?;
        return Ok((labels, names.len()));
    }
    let numbered: Option<Vec<u32>> = folders.iter().map(|f| f.parse::<u32>().ok()).collect();
    if let (true, Some(numbers)) = (test, numbered) {
        if let Some(count) = head.count {
            if let Some((f, _)) = folders
                .iter()
                .zip(&numbers)
                .find(|(_, &n)| n as usize >= count)
            {
                return Err(unknown(
                    f,
                    format!(
                        "is past the model's {count} classes (numbered folders are class indices)"
                    ),
                ));
            }
        }
        let count = head
            .count
            .unwrap_or_else(|| numbers.iter().max().map_or(0, |&m| m as usize + 1));
        return Ok((numbers, count));
    }
    let train = root.join("train");
    if !train.is_dir() {
        return Err(ModelError::format(
            dir,
            "the model has no class names to match these class folders with: --class-names FILE gives them",
        ));
    }
    let classes = list_dirs(&train)?;
    let labels = folders
        .iter()
        .map(|f| {
            classes
                .binary_search(f)
                .map(|i| i as u32)
                .map_err(|_| unknown(f, "is not a class folder of train/".to_string()))
        })
        .collect::<Result<_>>()?;
    Ok((labels, classes.len()))
}

/// The image files of an ImageFolder split, sorted by class folder then name, labelled with the
/// head's classes ([`label_folders`]); an evaluation split that holds fewer of the head's
/// classes says which ([`ListedFolder::groups`]).
pub fn list_image_folder(root: &Path, test: bool, head: &HeadClasses) -> Result<ListedFolder> {
    let dir = split_dir(root, test)?;
    let folders = list_dirs(&dir)?;
    if folders.is_empty() {
        return Err(ModelError::format(&dir, "holds no class folders"));
    }
    let (labels, head_classes) = label_folders(root, &dir, &folders, head, test)?;
    let mut files = Vec::new();
    for (class, &label) in folders.iter().zip(&labels) {
        files.extend(
            image_files(&dir.join(class))?
                .into_iter()
                .map(|p| (p, label)),
        );
    }
    let mut present = labels.clone();
    present.sort_unstable();
    present.dedup();
    if !(test && present.len() < head_classes) {
        return Ok(ListedFolder {
            files,
            groups: None,
            head_classes,
        });
    }
    // A subset: the labels become positions among the classes present.
    for (_, label) in &mut files {
        *label = present.binary_search(label).expect("a label present") as u32;
    }
    Ok(ListedFolder {
        files,
        groups: Some(present.into_iter().map(|c| vec![c]).collect()),
        head_classes,
    })
}

/// The images (.jpg, .jpeg, .png) of a class folder, sorted by name.
pub(crate) fn image_files(class_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(class_dir)
        .map_err(|e| ModelError::io(class_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            matches!(ext.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png")
        })
        .collect();
    names.sort();
    Ok(names)
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

/// The class folders of an ImageFolder split directory, sorted by name.
pub fn class_folders(dir: &Path) -> Result<Vec<String>> {
    list_dirs(dir)
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
