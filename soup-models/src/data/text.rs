//! Text data sets for language models: a directory holding `train/` and `val/` (or `test/`)
//! folders of `.txt` and `.md` files (one document each) and `.jsonl` files (one document per
//! line, its field `text`), any UTF-8. Documents are read in the order of their sorted paths,
//! tokenised with the model's tokenizer, joined with the end-of-sequence token and packed into
//! windows of `seq_len` tokens. As for images, the held-out split is taken from the training
//! documents (a seeded fraction of them, each document decided by its index alone, or the
//! documents an index file lists) and the test split is `test/` (else `val/`). The files are
//! streamed: what is held is one document and the windows asked for, never a whole corpus.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use std::collections::BTreeSet;

use soup_core::rng::{derive_seed, SplitMix64};

use super::{Heldout, Split};
use crate::error::{ModelError, Result};

/// Whether `root` is a text data set: a split folder holding at least one text file.
pub fn is_text(root: &Path) -> bool {
    ["train", "val", "test"].iter().any(|s| {
        std::fs::read_dir(root.join(s))
            .is_ok_and(|entries| entries.flatten().any(|e| text_kind(&e.path()).is_some()))
    })
}

/// How a file holds its documents.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The whole file is one document.
    Whole,
    /// One JSON object per line, the document its `text`.
    JsonLines,
}

fn text_kind(path: &Path) -> Option<Kind> {
    match path.extension()?.to_str()? {
        "txt" | "md" => Some(Kind::Whole),
        "jsonl" => Some(Kind::JsonLines),
        _ => None,
    }
}

/// The folder of `split`: `train/` for the training and held-out splits, `test/` (else `val/`)
/// for the test split.
pub fn split_dir(root: &Path, split: Split) -> Result<PathBuf> {
    let candidates: &[&str] = match split {
        Split::Train | Split::Heldout => &["train"],
        Split::Test => &["test", "val"],
    };
    candidates
        .iter()
        .map(|c| root.join(c))
        .find(|d| d.is_dir())
        .ok_or_else(|| {
            ModelError::format(
                root,
                format!(
                    "no {} folder of text files",
                    candidates
                        .iter()
                        .map(|c| format!("{c}/"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            )
        })
}

/// The text files of `dir`, in sorted order.
fn files(dir: &Path) -> Result<Vec<(PathBuf, Kind)>> {
    let mut out: Vec<(PathBuf, Kind)> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            text_kind(&p).map(|k| (p, k))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Which training documents are held out.
enum Held {
    /// Each document with probability `fraction`, drawn from the seed and its index.
    Fraction(f64, u64),
    /// The documents of these indices.
    Listed(BTreeSet<usize>),
}

impl Held {
    fn new(root: &Path, heldout: &Heldout) -> Result<Self> {
        match heldout {
            Heldout::Fraction { fraction, seed } => {
                if !(*fraction > 0.0 && *fraction < 1.0) {
                    return Err(ModelError::format(
                        root,
                        format!("held-out fraction {fraction} is not in (0, 1)"),
                    ));
                }
                Ok(Held::Fraction(*fraction, *seed))
            }
            Heldout::IndexFile(path) => {
                let listed = super::spec::read_index_file(path)?;
                Ok(Held::Listed(listed.into_iter().map(|(_, r)| r).collect()))
            }
        }
    }

    fn contains(&self, document: usize) -> bool {
        match self {
            Held::Fraction(fraction, seed) => {
                SplitMix64::new(derive_seed(*seed, &[document as u64])).next_f64() < *fraction
            }
            Held::Listed(listed) => listed.contains(&document),
        }
    }
}

/// Calls `each` with every document of `dir` in order, until it returns false.
fn documents(dir: &Path, mut each: impl FnMut(&str) -> Result<bool>) -> Result<()> {
    for (path, kind) in files(dir)? {
        let not_utf8 = |line: Option<usize>| {
            let at = line.map_or(String::new(), |l| format!(" (line {l})"));
            ModelError::format(&path, format!("not UTF-8 text{at}"))
        };
        match kind {
            Kind::Whole => {
                let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
                let text = std::str::from_utf8(&bytes).map_err(|_| not_utf8(None))?;
                if !each(text)? {
                    return Ok(());
                }
            }
            Kind::JsonLines => {
                let file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
                for (i, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
                    let line = line.map_err(|e| ModelError::io(&path, e))?;
                    let line = std::str::from_utf8(&line).map_err(|_| not_utf8(Some(i + 1)))?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let value: serde_json::Value = serde_json::from_str(line)
                        .map_err(|e| ModelError::format(&path, format!("line {}: {e}", i + 1)))?;
                    let text = value["text"].as_str().ok_or_else(|| {
                        ModelError::format(&path, format!("line {}: no string field text", i + 1))
                    })?;
                    if !each(text)? {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}

/// The first `max` windows (all, when `None`) of `seq_len` tokens of split `split` of the text
/// data set `root`: its documents tokenised by `tokenizer`, each followed by `eos`, packed end to
/// end (a window may span documents of its split; the tokens after the last whole window are
/// dropped). `heldout` says which training documents are the held-out split.
pub fn windows(
    root: &Path,
    (split, heldout): (Split, &Heldout),
    tokenizer: &tokenizers::Tokenizer,
    eos: u32,
    seq_len: usize,
    max: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    if seq_len < 2 {
        return Err(ModelError::format(root, "--seq-len must be at least 2"));
    }
    let dir = split_dir(root, split)?;
    let held = match split {
        Split::Test => None,
        _ => Some(Held::new(root, heldout)?),
    };
    let mut out: Vec<Vec<u32>> = Vec::new();
    let mut pending: Vec<u32> = Vec::with_capacity(seq_len);
    let want = max.unwrap_or(usize::MAX);
    let mut index = 0;
    documents(&dir, |text| {
        let document = index;
        index += 1;
        if let Some(held) = &held {
            if held.contains(document) != (split == Split::Heldout) {
                return Ok(true);
            }
        }
        let encoding = tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::format(&dir, format!("tokenizer: {e}")))?;
        for &id in encoding.get_ids().iter().chain(std::iter::once(&eos)) {
            pending.push(id);
            if pending.len() == seq_len {
                out.push(std::mem::replace(&mut pending, Vec::with_capacity(seq_len)));
                if out.len() == want {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    })?;
    if out.is_empty() {
        let which = match split {
            Split::Train => "training documents",
            Split::Heldout => "held-out documents",
            Split::Test => "text",
        };
        return Err(ModelError::format(
            &dir,
            format!("not one window of {seq_len} tokens in its {which}"),
        ));
    }
    Ok(out)
}

/// The tokenizer of a language model's directory (`tokenizer.json`) and its end-of-sequence id
/// (`generation_config.json`'s `eos_token_id`, else the tokenizer config's `eos_token`).
pub fn model_tokenizer(dir: &Path) -> Result<(tokenizers::Tokenizer, u32)> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(ModelError::format(
            &path,
            "missing: a language model's directory needs its tokenizer",
        ));
    }
    let tokenizer = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| ModelError::format(&path, format!("not a tokenizer: {e}")))?;
    let read = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
    };
    let eos = read("generation_config.json")
        .and_then(|g| g["eos_token_id"].as_u64().map(|v| v as u32))
        .or_else(|| {
            let c = read("tokenizer_config.json")?;
            tokenizer.token_to_id(c["eos_token"].as_str()?)
        })
        .ok_or_else(|| {
            ModelError::format(
                dir,
                "no end-of-sequence token (generation_config.json eos_token_id, or \
                 tokenizer_config.json eos_token)",
            )
        })?;
    Ok((tokenizer, eos))
}
