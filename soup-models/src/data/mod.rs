//! Labelled image data sets in their standard on-disk formats, the held-out split, and the
//! preprocessing that turns them into model inputs.
//!
//! - idx(.gz) files of MNIST and Fashion-MNIST (`train-images-idx3-ubyte.gz`, ...); the name
//!   `fashion-mnist` means the Debian package's `/usr/share/datasets/fashion-mnist`;
//! - CIFAR-10 (`data_batch_{1..5}.bin`, `test_batch.bin`) and CIFAR-100 (`train.bin`, `test.bin`)
//!   binary versions;
//! - ImageFolder, the ImageNet layout: `train/<class>/*.{jpg,jpeg,png}` and `val/<class>/...` (or
//!   `test/`), classes in sorted order, decoded in parallel.
//!
//! The held-out split is carved out of the training split (a seeded fraction, or an index file as
//! model-soups' ImageNet split); the test split is never used to choose anything.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use soup_core::rng::{permutation, SplitMix64};

use crate::arch::InputSpec;
use crate::error::{ModelError, Result};
use crate::train::objective::Dataset;

pub mod resize;
pub mod stream;

/// Where the `fashion-mnist` data set name points (Debian package `dataset-fashion-mnist`).
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Images as stored: u8 pixels, n × channels × height × width, and labels.
#[derive(Clone, Debug, PartialEq)]
pub struct RawImages {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
    pub num_classes: usize,
}

impl RawImages {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The images at `rows`, in that order.
    pub fn subset(&self, rows: &[usize]) -> RawImages {
        let len = self.image_len();
        let mut pixels = Vec::with_capacity(rows.len() * len);
        for &r in rows {
            pixels.extend_from_slice(&self.pixels[r * len..(r + 1) * len]);
        }
        RawImages {
            pixels,
            labels: rows.iter().map(|&r| self.labels[r]).collect(),
            ..self.clone()
        }
    }
}

/// A split of a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The training split without the held-out examples.
    Train,
    /// The held-out split: chooses soups, never trains models.
    Heldout,
    /// The official test split.
    Test,
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "heldout" => Ok(Split::Heldout),
            "test" => Ok(Split::Test),
            other => Err(format!("unknown split {other:?} (train, heldout, test)")),
        }
    }
}

/// How the held-out split is taken from the training split.
#[derive(Clone, Debug, PartialEq)]
pub enum Heldout {
    /// A seeded random fraction of the training examples.
    Fraction { fraction: f64, seed: u64 },
    /// Indices into the training split, one per line (model-soups' ImageNet split is one).
    IndexFile(PathBuf),
}

impl Default for Heldout {
    fn default() -> Self {
        Heldout::Fraction {
            fraction: 0.1,
            seed: 0,
        }
    }
}

/// A data set on disk.
#[derive(Clone, Debug, PartialEq)]
pub struct DataSpec {
    pub root: PathBuf,
    pub heldout: Heldout,
    /// How ImageFolder images are resized and cropped.
    pub preprocess: Preprocess,
}

impl DataSpec {
    /// `fashion-mnist` or a path, with the default held-out split (a seeded 10 %).
    pub fn new(name: &str) -> Self {
        let root = if name == "fashion-mnist" {
            PathBuf::from(FASHION_MNIST_DIR)
        } else {
            PathBuf::from(name)
        };
        Self {
            root,
            heldout: Heldout::default(),
            preprocess: Preprocess::default(),
        }
    }

    /// Loads split `split`.
    pub fn load(&self, split: Split) -> Result<RawImages> {
        let format = detect(&self.root)?;
        let test = split == Split::Test;
        let all = match format {
            Format::Idx => read_idx_split(&self.root, test)?,
            Format::Cifar10 => read_cifar(&self.root, test, 10)?,
            Format::Cifar100 => read_cifar(&self.root, test, 100)?,
            Format::ImageFolder => read_image_folder(&self.root, test, self.preprocess)?,
        };
        let rows = self.split_rows(split, all.len())?;
        Ok(if test { all } else { all.subset(&rows) })
    }

    /// The number of classes (an ImageFolder's are its class folders: nothing is decoded).
    pub fn num_classes(&self) -> Result<usize> {
        if self.is_image_folder()? {
            return Ok(list_dirs(&self.root.join("train"))?.len());
        }
        Ok(self.load(Split::Test)?.num_classes)
    }

    /// Whether the data set is an ImageFolder (which [`DataSpec::stream`] can serve).
    pub fn is_image_folder(&self) -> Result<bool> {
        Ok(matches!(detect(&self.root)?, Format::ImageFolder))
    }

    /// Split `split` of an ImageFolder, at most `max` examples, as a [`Dataset`] whose images are
    /// decoded and prepared for `input` only when a batch asks for them (straight to the model's
    /// size), so that memory holds a few batches whatever the data set's size.
    pub fn stream(&self, split: Split, input: &InputSpec, max: Option<usize>) -> Result<Dataset> {
        let (files, _) = list_image_folder(&self.root, split == Split::Test)?;
        let mut rows = self.split_rows(split, files.len())?;
        if let Some(m) = max {
            rows.truncate(m);
        }
        let (paths, labels) = rows.iter().map(|&r| files[r].clone()).unzip();
        let source = stream::FolderSource::new(paths, input.clone(), self.preprocess)?;
        Ok(Dataset::stream(std::sync::Arc::new(source), labels))
    }

    /// The rows of `split` among the `n` examples read (all of them for the test split; the
    /// training split without the held-out rows, or those rows).
    fn split_rows(&self, split: Split, n: usize) -> Result<Vec<usize>> {
        if n == 0 {
            return Err(ModelError::format(&self.root, "the split holds no images"));
        }
        if split == Split::Test {
            return Ok((0..n).collect());
        }
        let heldout = self.heldout_rows(n)?;
        let rows: Vec<usize> = match split {
            Split::Heldout => heldout,
            _ => {
                let mut is_heldout = vec![false; n];
                for &r in &heldout {
                    is_heldout[r] = true;
                }
                (0..n).filter(|&r| !is_heldout[r]).collect()
            }
        };
        if rows.is_empty() {
            return Err(ModelError::format(
                &self.root,
                format!("the {split:?} split is empty"),
            ));
        }
        Ok(rows)
    }

    /// The training-split rows of the held-out split, sorted.
    pub fn heldout_rows(&self, n: usize) -> Result<Vec<usize>> {
        let mut rows = match &self.heldout {
            Heldout::Fraction { fraction, seed } => {
                if !(*fraction > 0.0 && *fraction < 1.0) {
                    return Err(ModelError::format(
                        &self.root,
                        format!("held-out fraction {fraction} is not in (0, 1)"),
                    ));
                }
                if n < 2 {
                    return Err(ModelError::format(
                        &self.root,
                        format!("{n} training example(s): too few to hold any out"),
                    ));
                }
                let k = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
                permutation(n, *seed)[..k].to_vec()
            }
            Heldout::IndexFile(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
                let mut rows = Vec::new();
                for (i, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() {
                        continue;
                    }
                    let r: usize = line.parse().map_err(|_| {
                        ModelError::format(path, format!("line {}: not an index: {line:?}", i + 1))
                    })?;
                    if r >= n {
                        return Err(ModelError::format(
                            path,
                            format!("line {}: index {r} ≥ {n} training examples", i + 1),
                        ));
                    }
                    rows.push(r);
                }
                rows
            }
        };
        rows.sort_unstable();
        rows.dedup();
        Ok(rows)
    }
}

enum Format {
    Idx,
    Cifar10,
    Cifar100,
    ImageFolder,
}

fn detect(root: &Path) -> Result<Format> {
    if !root.is_dir() {
        return Err(ModelError::format(root, "no such data directory"));
    }
    let has = |name: &str| root.join(name).exists();
    if has("train-images-idx3-ubyte.gz") || has("train-images-idx3-ubyte") {
        Ok(Format::Idx)
    } else if has("data_batch_1.bin") {
        Ok(Format::Cifar10)
    } else if has("train.bin") && has("test.bin") {
        Ok(Format::Cifar100)
    } else if root.join("train").is_dir() {
        Ok(Format::ImageFolder)
    } else {
        Err(ModelError::format(
            root,
            "unknown data set layout (expected idx files, CIFAR .bin files, or train/<class>/ folders)",
        ))
    }
}

/// Reads a file, gunzipping it when it ends in `.gz`; `name` is tried with and without `.gz`.
fn read_maybe_gz(root: &Path, name: &str) -> Result<(PathBuf, Vec<u8>)> {
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

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The idx files of one split: images (magic 0x803: n, rows, cols) and labels (magic 0x801: n).
fn read_idx_split(root: &Path, test: bool) -> Result<RawImages> {
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
fn read_cifar(root: &Path, test: bool, classes: usize) -> Result<RawImages> {
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

/// Side of the square images ImageFolder decodes to (resized on the shorter side, then centre-
/// cropped: [`Preprocess`]), CLIP's input size; a model of another size resizes these squares.
pub const IMAGE_FOLDER_SIDE: usize = 224;

/// `train/<class>/*` or `val/<class>/*` (`test/<class>/*`), decoded in parallel to RGB, resized
/// and centre-cropped to [`IMAGE_FOLDER_SIDE`] as `preprocess` says.
fn read_image_folder(root: &Path, test: bool, preprocess: Preprocess) -> Result<RawImages> {
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
fn list_image_folder(root: &Path, test: bool) -> Result<(Vec<(PathBuf, u32)>, usize)> {
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

fn list_dirs(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// How an image is brought to the model's square input: CLIP's preprocessing, which resizes the
/// shorter side to the model's size with Pillow's bicubic filter ([`resize::resize_plane`], bit
/// for bit) and the longer side to `int(side × long / short)`, then crops the centre. The two
/// variants differ only in where an odd margin puts the crop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preprocess {
    /// OpenAI's `preprocess` (torchvision `Resize` + `CenterCrop` on PIL images), as model-soups
    /// and open_clip prepare images: crop offset `round(margin / 2)`, halves to even.
    #[default]
    Clip,
    /// transformers' `CLIPImageProcessorPil`: crop offset `margin / 2` rounded down.
    HfClip,
}

impl Preprocess {
    pub const NAMES: &'static [&'static str] = &["clip", "hf-clip"];

    /// The offset of a centred crop of `side` out of `len` pixels.
    fn crop_offset(self, len: usize, side: usize) -> usize {
        let margin = len - side;
        match self {
            // Python's round(margin / 2.0): an odd margin's half rounds to the even neighbour.
            Preprocess::Clip if margin % 2 == 1 && (margin / 2) % 2 == 1 => margin / 2 + 1,
            Preprocess::Clip | Preprocess::HfClip => margin / 2,
        }
    }
}

impl std::str::FromStr for Preprocess {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "clip" => Ok(Preprocess::Clip),
            "hf-clip" => Ok(Preprocess::HfClip),
            other => Err(format!("unknown preprocessing {other:?} (clip, hf-clip)")),
        }
    }
}

/// `planes` (`channels` planes of `h` × `w` u8 pixels) resized on the shorter side to `side`
/// and centre-cropped to `side` × `side` as `preprocess` does, planar.
pub fn resize_crop_planes(
    planes: &[u8],
    channels: usize,
    w: usize,
    h: usize,
    side: usize,
    preprocess: Preprocess,
) -> Vec<u8> {
    let (nw, nh) = if w <= h {
        (side, side * h / w)
    } else {
        (side * w / h, side)
    };
    // Python computes int(side * long / short) in floating point; for the sizes images have
    // (below 2^26 pixels a side) that equals the integer quotient.
    let (left, top) = (
        preprocess.crop_offset(nw, side),
        preprocess.crop_offset(nh, side),
    );
    let mut out = Vec::with_capacity(channels * side * side);
    for plane in planes.chunks(w * h).take(channels) {
        let resized = resize::resize_plane(plane, w, h, nw, nh);
        for row in resized.chunks(nw).skip(top).take(side) {
            out.extend_from_slice(&row[left..left + side]);
        }
    }
    out
}

/// An RGB image as planes, resized and cropped to `side` × `side` ([`resize_crop_planes`]).
pub fn square_rgb(img: &image::RgbImage, side: usize, preprocess: Preprocess) -> Vec<u8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut planes = vec![0u8; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            planes[c * w * h + i] = p[c];
        }
    }
    resize_crop_planes(&planes, 3, w, h, side, preprocess)
}

/// Model inputs from stored images: channels matched (grey replicated to RGB, RGB averaged to
/// grey), resized (shorter side, bicubic) and centre-cropped to the model's size, scaled to
/// [0, 1] and normalised with the model's per-channel mean and standard deviation.
pub fn prepare(raw: &RawImages, spec: &InputSpec, device: &Device) -> Result<Dataset> {
    check_input(spec, raw.channels)?;
    let (c, side) = (spec.channels, spec.height);
    let len = raw.channels * raw.height * raw.width;
    let mut images = vec![0f32; raw.len() * c * side * side];
    images
        .par_chunks_mut(c * side * side)
        .zip(raw.pixels.par_chunks(len))
        .for_each(|(out, img)| prepare_one(img, raw.channels, raw.height, raw.width, spec, out));
    Ok(Dataset::in_memory(
        Tensor::from_vec(images, (raw.len(), c, side, side), device)?,
        raw.labels.clone(),
    ))
}

/// Refuses model inputs [`prepare_one`] cannot make.
pub(crate) fn check_input(spec: &InputSpec, channels: usize) -> Result<()> {
    if spec.height != spec.width {
        return Err(ModelError::config(
            "data",
            "only square model inputs are supported",
        ));
    }
    if channels != 1 && channels != 3 {
        return Err(ModelError::config(
            "data",
            "images must have 1 or 3 channels",
        ));
    }
    Ok(())
}

/// One stored image (`channels` planes of `h` × `w` u8) as the model's input, into `out`: channels matched
/// (grey replicated, RGB averaged to grey), resized to the model's side when it is not, scaled to
/// [0, 1] and normalised.
pub(crate) fn prepare_one(
    img: &[u8],
    channels: usize,
    h: usize,
    w: usize,
    spec: &InputSpec,
    out: &mut [f32],
) {
    let (c, side) = (spec.channels, spec.height);
    let plane = side * side;
    let planes = resize_planes(img, channels, h, w, side);
    for (ch, out) in out.chunks_mut(plane).take(c).enumerate() {
        let (m, s) = (spec.mean[ch], spec.std[ch]);
        match (channels, c) {
            (1, _) => {
                for (o, v) in out.iter_mut().zip(&planes[..plane]) {
                    *o = (v / 255.0 - m) / s;
                }
            }
            (3, 1) => {
                for (p, o) in out.iter_mut().enumerate() {
                    let v = (planes[p] + planes[plane + p] + planes[2 * plane + p]) / 3.0;
                    *o = (v / 255.0 - m) / s;
                }
            }
            _ => {
                for (o, v) in out.iter_mut().zip(&planes[ch * plane..(ch + 1) * plane]) {
                    *o = (v / 255.0 - m) / s;
                }
            }
        }
    }
}

/// One image's planes as f32 in 0..255, resized to `side` × `side` (identity when it already is).
fn resize_planes(img: &[u8], channels: usize, h: usize, w: usize, side: usize) -> Vec<f32> {
    if h == side && w == side {
        return img.iter().map(|&v| v as f32).collect();
    }
    resize_crop_planes(img, channels, w, h, side, Preprocess::Clip)
        .into_iter()
        .map(f32::from)
        .collect()
}

/// A distribution shift applied to stored images: the stand-in for model-soups' shifted test sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shift {
    /// Gaussian pixel noise, standard deviation 0.2 of the pixel range.
    Noise,
    /// A 3 × 3 box blur.
    Blur,
    /// A 20° rotation about the centre (nearest neighbour, black fill).
    Rotate,
    /// Contrast reduced to 40 % around each image's mean.
    Contrast,
}

impl Shift {
    pub const ALL: [Shift; 4] = [Shift::Noise, Shift::Blur, Shift::Rotate, Shift::Contrast];

    /// `noise`, `blur`, `rotate`, `contrast`, or `all`.
    pub fn parse_list(s: &str) -> std::result::Result<Vec<Shift>, String> {
        s.split(',')
            .map(|name| match name.trim() {
                "noise" => Ok(vec![Shift::Noise]),
                "blur" => Ok(vec![Shift::Blur]),
                "rotate" => Ok(vec![Shift::Rotate]),
                "contrast" => Ok(vec![Shift::Contrast]),
                "all" => Ok(Shift::ALL.to_vec()),
                other => Err(format!(
                    "unknown shift {other:?} (noise, blur, rotate, contrast, all)"
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(|v| v.concat())
    }

    fn apply(self, img: &mut [u8], channels: usize, h: usize, w: usize, rng: &mut SplitMix64) {
        let plane = h * w;
        match self {
            Shift::Noise => {
                for (v, e) in img.iter_mut().zip(rng.normals(channels * plane)) {
                    *v = (*v as f64 + 0.2 * 255.0 * e).round().clamp(0.0, 255.0) as u8;
                }
            }
            Shift::Blur => {
                for ch in img.chunks_mut(plane) {
                    let src = ch.to_vec();
                    for y in 0..h {
                        for x in 0..w {
                            let (mut sum, mut count) = (0u32, 0u32);
                            for yy in y.saturating_sub(1)..(y + 2).min(h) {
                                for xx in x.saturating_sub(1)..(x + 2).min(w) {
                                    sum += src[yy * w + xx] as u32;
                                    count += 1;
                                }
                            }
                            ch[y * w + x] = ((sum + count / 2) / count) as u8;
                        }
                    }
                }
            }
            Shift::Rotate => {
                let (sin, cos) = 20f64.to_radians().sin_cos();
                let (cy, cx) = ((h as f64 - 1.0) / 2.0, (w as f64 - 1.0) / 2.0);
                for ch in img.chunks_mut(plane) {
                    let src = ch.to_vec();
                    for y in 0..h {
                        for x in 0..w {
                            let (dy, dx) = (y as f64 - cy, x as f64 - cx);
                            let sy = (cos * dy - sin * dx + cy).round();
                            let sx = (sin * dy + cos * dx + cx).round();
                            let inside = sy >= 0.0 && sx >= 0.0 && sy < h as f64 && sx < w as f64;
                            ch[y * w + x] = if inside {
                                src[sy as usize * w + sx as usize]
                            } else {
                                0
                            };
                        }
                    }
                }
            }
            Shift::Contrast => {
                let mean = img.iter().map(|&v| v as f64).sum::<f64>() / img.len() as f64;
                for v in img.iter_mut() {
                    *v = (mean + 0.4 * (*v as f64 - mean)).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
}

/// The images under each shift in turn: `shifts.len()` copies of `raw`, labels repeated; the
/// noise is drawn from `seed`.
pub fn shifted(raw: &RawImages, shifts: &[Shift], seed: u64) -> RawImages {
    let mut rng = SplitMix64::new(seed);
    let len = raw.image_len();
    let mut out = RawImages {
        pixels: Vec::with_capacity(raw.pixels.len() * shifts.len()),
        labels: Vec::with_capacity(raw.labels.len() * shifts.len()),
        ..raw.clone()
    };
    for &s in shifts {
        for (img, &label) in raw.pixels.chunks(len).zip(&raw.labels) {
            let mut img = img.to_vec();
            s.apply(&mut img, raw.channels, raw.height, raw.width, &mut rng);
            out.pixels.extend(img);
            out.labels.push(label);
        }
    }
    out
}
