//! ImageNet's distribution shifts as they are distributed, by name: `imagenet-v2:DIR`,
//! `imagenet-r:DIR`, `imagenet-a:DIR`, `imagenet-sketch:DIR` and `objectnet:DIR`, evaluated as
//! model-soups and wise-ft evaluate them (their `datasets/` code):
//!
//! - ImageNetV2: class folders `0` … `999`, ImageNet's class indices;
//! - ImageNet-Sketch: the 1,000 WordNet-id folders of ImageNet;
//! - ImageNet-R and ImageNet-A: WordNet-id folders of 200 classes each; the logits are
//!   restricted to those 200 (`CLASS_SUBLIST`) before the loss and the argmax;
//! - ObjectNet: its own folders (`objectnet-1.0/images/<name>/`), of which the 113 classes
//!   ImageNet shares are scored (the others are left out, as wise-ft does); each stands for one
//!   or more ImageNet classes, and its logit is the largest of theirs; every image loses a
//!   2-pixel border first.
//!
//! The class lists are in `imagenet/` beside this file, written by `imagenet/make_lists.py`
//! from timm's ImageNet synset lists and wise-ft's ObjectNet metadata.
//!
//! A model is matched to ImageNet's classes through WordNet ids: a model whose classes are named
//! by them (one trained by soup on an ImageNet folder), or a model without names whose head has
//! ImageNet's 1,000 classes in their standard order (model-soups' CLIP checkpoints).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::folder::{class_folders, HeadClasses, ListedFolder};
use crate::error::{ModelError, Result};

const SYNSETS: &str = include_str!("imagenet/synsets.tsv");
const IMAGENET_A: &str = include_str!("imagenet/imagenet_a.txt");
const IMAGENET_R: &str = include_str!("imagenet/imagenet_r.txt");
const OBJECTNET: &str = include_str!("imagenet/objectnet.tsv");

/// ImageNet-1k's WordNet ids, in its class order.
pub fn synsets() -> Vec<&'static str> {
    SYNSETS
        .lines()
        .map(|l| l.split('\t').next().unwrap_or(l))
        .collect()
}

/// The classes a layout scores, each as the ImageNet classes that stand for it, and each class
/// folder's class among them (`None`: left out).
type Scored = (Vec<Vec<usize>>, Vec<Option<usize>>);

/// One of ImageNet's distribution shifts, as distributed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    V2,
    R,
    A,
    Sketch,
    ObjectNet,
}

impl Layout {
    pub const ALL: [Layout; 5] = [
        Layout::V2,
        Layout::R,
        Layout::A,
        Layout::Sketch,
        Layout::ObjectNet,
    ];

    /// The prefix that names the layout in `--data` and `--test`.
    pub fn name(self) -> &'static str {
        match self {
            Layout::V2 => "imagenet-v2",
            Layout::R => "imagenet-r",
            Layout::A => "imagenet-a",
            Layout::Sketch => "imagenet-sketch",
            Layout::ObjectNet => "objectnet",
        }
    }

    /// `NAME:DIR` as a layout and its directory; `None` where `data` names no layout.
    pub fn parse(data: &str) -> Option<(Layout, PathBuf)> {
        let (prefix, dir) = data.split_once(':')?;
        let layout = Layout::ALL.into_iter().find(|l| l.name() == prefix)?;
        Some((layout, PathBuf::from(dir)))
    }

    /// The class folders of the layout as distributed (for stand-ins): V2's numbers, the
    /// WordNet ids of Sketch, R and A, ObjectNet's folders of the classes ImageNet shares.
    pub fn class_folders(self) -> Vec<String> {
        let lines = |text: &'static str| text.lines().map(str::to_string).collect();
        match self {
            Layout::V2 => (0..1000).map(|i| i.to_string()).collect(),
            Layout::Sketch => synsets().into_iter().map(str::to_string).collect(),
            Layout::R => lines(IMAGENET_R),
            Layout::A => lines(IMAGENET_A),
            Layout::ObjectNet => OBJECTNET
                .lines()
                .filter_map(|l| l.split_once('\t'))
                .map(|(folder, _)| folder.to_string())
                .collect(),
        }
    }

    /// The pixels cut from every side of an image before it is prepared (ObjectNet's border).
    pub fn border(self) -> u32 {
        match self {
            Layout::ObjectNet => 2,
            _ => 0,
        }
    }

    /// The directory holding the class folders: DIR itself, or for ObjectNet `DIR/images`
    /// where DIR is the unpacked `objectnet-1.0`.
    fn images(self, root: &Path) -> PathBuf {
        match self {
            Layout::ObjectNet if root.join("images").is_dir() => root.join("images"),
            _ => root.to_path_buf(),
        }
    }

    /// The classes scored, each as the ImageNet classes (indices) whose logits stand for it, and
    /// each class folder's class among them; `None` for a folder the layout leaves out
    /// (ObjectNet's classes outside ImageNet).
    fn classes(self, dir: &Path, folders: &[String]) -> Result<Scored> {
        let synsets = synsets();
        let index: HashMap<&str, usize> =
            synsets.iter().enumerate().map(|(i, s)| (*s, i)).collect();
        let unknown = |f: &str, what: &str| {
            ModelError::format(&dir.join(f), format!("class folder {f:?} {what}"))
        };
        match self {
            Layout::V2 | Layout::Sketch => {
                let classes = (0..synsets.len()).map(|i| vec![i]).collect();
                let labels = folders
                    .iter()
                    .map(|f| {
                        let i = match self {
                            Layout::V2 => f.parse::<usize>().ok().filter(|&i| i < synsets.len()),
                            _ => index.get(f.as_str()).copied(),
                        };
                        i.map(Some).ok_or_else(|| {
                            unknown(f, &format!("is not a class of {}", self.name()))
                        })
                    })
                    .collect::<Result<_>>()?;
                Ok((classes, labels))
            }
            Layout::R | Layout::A => {
                let list = if self == Layout::R {
                    IMAGENET_R
                } else {
                    IMAGENET_A
                };
                let sub: Vec<&str> = list.lines().collect();
                let classes = sub.iter().map(|s| vec![index[s]]).collect();
                let labels = folders
                    .iter()
                    .map(|f| {
                        sub.iter().position(|s| s == f).map(Some).ok_or_else(|| {
                            unknown(f, &format!("is not one of {}'s 200 classes", self.name()))
                        })
                    })
                    .collect::<Result<_>>()?;
                Ok((classes, labels))
            }
            Layout::ObjectNet => {
                let rows: Vec<(&str, Vec<usize>)> = OBJECTNET
                    .lines()
                    .filter_map(|l| l.split_once('\t'))
                    .map(|(folder, ids)| (folder, ids.split(',').map(|s| index[s]).collect()))
                    .collect();
                let labels = folders
                    .iter()
                    .map(|f| rows.iter().position(|(folder, _)| folder == f))
                    .collect();
                Ok((rows.into_iter().map(|(_, ids)| ids).collect(), labels))
            }
        }
    }

    /// The image files of the layout at `root`, each with its class among those scored, and the
    /// classes scored as groups of `head`'s classes (a model with WordNet-id names, or a head of
    /// ImageNet's 1,000 classes in their order).
    pub fn list(self, root: &Path, head: &HeadClasses) -> Result<ListedFolder> {
        let dir = self.images(root);
        if !dir.is_dir() {
            return Err(ModelError::format(
                root,
                format!("no {} folder here", self.name()),
            ));
        }
        let folders = class_folders(&dir)?;
        let (classes, labels) = self.classes(&dir, &folders)?;
        let synsets = synsets();
        let to_head = |i: usize| -> Result<u32> {
            match (&head.names, head.count) {
                (Some(names), _) => names.iter().position(|n| n == synsets[i]).map(|p| p as u32).ok_or_else(|| {
                    ModelError::format(
                        root,
                        format!(
                            "{} holds ImageNet class {} but the model's class names do not (its classes must be named by WordNet ids: --class-names)",
                            self.name(),
                            synsets[i]
                        ),
                    )
                }),
                (None, Some(count)) if count == synsets.len() => Ok(i as u32),
                (None, count) => Err(ModelError::format(
                    root,
                    format!(
                        "{} is scored with ImageNet's 1,000 classes; the model has {} and no names (--class-names with WordNet ids matches them)",
                        self.name(),
                        count.map_or("an unknown number of classes".to_string(), |c| format!("{c} classes"))
                    ),
                )),
            }
        };
        let groups: Vec<Vec<u32>> = classes
            .iter()
            .map(|g| g.iter().map(|&i| to_head(i)).collect())
            .collect::<Result<_>>()?;
        let mut files = Vec::new();
        for (folder, label) in folders.iter().zip(&labels) {
            let Some(label) = label else { continue };
            for path in super::folder::image_files(&dir.join(folder))? {
                files.push((path, *label as u32));
            }
        }
        if files.is_empty() {
            return Err(ModelError::format(
                &dir,
                format!("holds no images of {}'s classes", self.name()),
            ));
        }
        // The head's own classes in its own order need no projection.
        let identity = groups.len() == head.count.unwrap_or(0)
            && groups.iter().enumerate().all(|(i, g)| g == &[i as u32]);
        Ok(ListedFolder {
            head_classes: head.count.unwrap_or(groups.len()),
            files,
            groups: (!identity).then_some(groups),
        })
    }
}
