//! [`DataSpec`]: a data set on disk by name, its splits (the held-out one carved out of the
//! training split) and the format it is in.

use std::path::{Path, PathBuf};

use soup_core::rng::permutation;

use super::folder::{list_dirs, list_image_folder, read_image_folder, HeadClasses};
use super::formats::{read_cifar, read_idx_split};
use super::imagenet::Layout;
use super::preprocess::Preprocess;
use crate::arch::ImageSpec;
use crate::error::{ModelError, Result};
use crate::train::objective::Dataset;

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

    pub(crate) fn image_len(&self) -> usize {
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
    /// One of ImageNet's distribution shifts, as distributed (`imagenet-r:DIR`, …).
    pub layout: Option<Layout>,
}

impl DataSpec {
    /// `fashion-mnist`, one of ImageNet's shifts by name (`imagenet-r:DIR`: [`Layout`]) or a
    /// path, with the default held-out split (a seeded 10 %).
    pub fn new(name: &str) -> Self {
        let (root, layout) = match Layout::parse(name) {
            Some((layout, dir)) => (dir, Some(layout)),
            None if name == "fashion-mnist" => (PathBuf::from(FASHION_MNIST_DIR), None),
            None => (PathBuf::from(name), None),
        };
        Self {
            root,
            heldout: Heldout::default(),
            preprocess: Preprocess::default(),
            layout,
        }
    }

    /// An evaluation-only layout asked for another split, or read whole: an error naming it.
    fn layout_only_streamed(&self, split: Split) -> Result<()> {
        match self.layout {
            Some(l) if split != Split::Test => Err(ModelError::format(
                &self.root,
                format!(
                    "{} is an evaluation set: it has no {split:?} split",
                    l.name()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Loads split `split`.
    pub fn load(&self, split: Split) -> Result<RawImages> {
        self.layout_only_streamed(split)?;
        if let Some(l) = self.layout {
            return Err(ModelError::format(
                &self.root,
                format!(
                    "{} is read batch by batch for a model (soup eval, --test), not whole",
                    l.name()
                ),
            ));
        }
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
        if self.layout.is_some() {
            if !self.root.is_dir() {
                return Err(ModelError::format(&self.root, "no such data directory"));
            }
            return Ok(true);
        }
        Ok(matches!(detect(&self.root)?, Format::ImageFolder))
    }

    /// Split `split` of an ImageFolder, at most `max` examples, as a [`Dataset`] whose images are
    /// decoded and prepared for `input` only when a batch asks for them (straight to the model's
    /// size), so that memory holds a few batches whatever the data set's size.
    /// Its class folders are matched to `head`'s classes ([`super::folder::label_folders`]).
    pub fn stream(
        &self,
        split: Split,
        input: &ImageSpec,
        max: Option<usize>,
        head: &HeadClasses,
    ) -> Result<Dataset> {
        self.layout_only_streamed(split)?;
        let listed = match self.layout {
            Some(layout) => layout.list(&self.root, head)?,
            None => list_image_folder(&self.root, split == Split::Test, head)?,
        };
        let files = listed.files;
        let mut rows = self.split_rows(split, files.len())?;
        if let Some(m) = max {
            rows.truncate(m);
        }
        let (paths, labels) = rows.iter().map(|&r| files[r].clone()).unzip();
        let border = self.layout.map_or(0, Layout::border);
        let source = super::stream::FolderSource::new(paths, input.clone(), self.preprocess)?
            .with_border(border);
        let mut data = Dataset::stream(std::sync::Arc::new(source), labels);
        data.classes = listed.groups;
        Ok(data)
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
                let rows = read_index_file(path)?;
                if let Some(&(line, r)) = rows.iter().find(|&&(_, r)| r >= n) {
                    return Err(ModelError::format(
                        path,
                        format!("line {line}: index {r} ≥ {n} training examples"),
                    ));
                }
                rows.into_iter().map(|(_, r)| r).collect()
            }
        };
        rows.sort_unstable();
        rows.dedup();
        Ok(rows)
    }
}

/// The indices of a held-out index file, one per line (blank lines skipped), each with its line
/// number.
pub(crate) fn read_index_file(path: &Path) -> Result<Vec<(usize, usize)>> {
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
        rows.push((i + 1, r));
    }
    Ok(rows)
}

pub(crate) enum Format {
    Idx,
    Cifar10,
    Cifar100,
    ImageFolder,
}

pub(crate) fn detect(root: &Path) -> Result<Format> {
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
    } else if ["train", "val", "test"]
        .iter()
        .any(|split| root.join(split).is_dir())
    {
        Ok(Format::ImageFolder)
    } else {
        Err(ModelError::format(
            root,
            "unknown data set layout (expected idx files, CIFAR .bin files, or train/<class>/ (or only val/<class>/ or test/<class>/) folders)",
        ))
    }
}
