//! Text data sets for language models: a directory holding `train/` and `val/` (or `test/`)
//! folders of `.txt` and `.md` files (one document each) and `.jsonl` files (one document per
//! line, its field `text`), any UTF-8. Documents are read in the order of their sorted paths,
//! tokenised with the model's tokenizer, joined with the end-of-sequence token and packed into
//! windows of `seq_len` tokens. As for images, the held-out split is taken from the training
//! documents (a seeded fraction of them, each document decided by its index alone, or the
//! documents an index file lists) and the test split is `test/` (else `val/`). The files are
//! streamed: what is held is a piece of one document and the windows asked for, never a whole
//! corpus. A document longer than [`PIECE_BYTES`] is read and tokenised in pieces that end at a
//! line break; a split read again and again (training) that is larger than memory is tokenised
//! once into a file of tokens ([`TokenFile`]) and read from it window by window
//! ([`spillable_windows`]).

use std::io::{BufRead, Read, Write};
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

/// Bytes of a document read and tokenised at a time: a longer document is cut into pieces at
/// line breaks (the first line break after this many bytes, or the end), so a file of any size
/// is held a piece at a time.
pub const PIECE_BYTES: usize = 1 << 20;

/// Calls `each` with every document of `dir` in order, piece by piece (`last` on a document's
/// last piece), until it returns false.
fn documents(dir: &Path, mut each: impl FnMut(&str, bool) -> Result<bool>) -> Result<()> {
    for (path, kind) in files(dir)? {
        let not_utf8 = |line: Option<usize>| {
            let at = line.map_or(String::new(), |l| format!(" (line {l})"));
            ModelError::format(&path, format!("not UTF-8 text{at}"))
        };
        let file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        let mut reader = std::io::BufReader::new(file);
        match kind {
            Kind::Whole => {
                let mut piece: Vec<u8> = Vec::new();
                loop {
                    // Whole lines up to PIECE_BYTES: a piece never splits a character.
                    let mut end = false;
                    while piece.len() < PIECE_BYTES {
                        let read = (&mut reader)
                            .take((PIECE_BYTES - piece.len()) as u64)
                            .read_until(b'\n', &mut piece)
                            .map_err(|e| ModelError::io(&path, e))?;
                        if read == 0 {
                            end = true;
                            break;
                        }
                    }
                    if !end && piece.last() != Some(&b'\n') {
                        reader
                            .read_until(b'\n', &mut piece)
                            .map_err(|e| ModelError::io(&path, e))?;
                    }
                    if !end {
                        end = reader
                            .fill_buf()
                            .map_err(|e| ModelError::io(&path, e))?
                            .is_empty();
                    }
                    let text = std::str::from_utf8(&piece).map_err(|_| not_utf8(None))?;
                    if !each(text, end)? {
                        return Ok(());
                    }
                    piece.clear();
                    if end {
                        break;
                    }
                }
            }
            Kind::JsonLines => {
                for (i, line) in reader.split(b'\n').enumerate() {
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
                    if !each(text, true)? {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}

/// Calls `each` with the windows of `seq_len` tokens of split `split` of the text data set
/// `root`, in order, until it returns false or `max` windows were given: its documents
/// tokenised by `tokenizer`, each followed by `eos`, packed end to end (a window may span
/// documents of its split; the tokens after the last whole window are dropped). `heldout` says
/// which training documents are the held-out split. Returns the number of windows given.
pub fn visit_windows(
    root: &Path,
    (split, heldout): (Split, &Heldout),
    (tokenizer, eos): (&tokenizers::Tokenizer, u32),
    seq_len: usize,
    max: Option<usize>,
    mut each: impl FnMut(Vec<u32>) -> Result<bool>,
) -> Result<usize> {
    if seq_len < 2 {
        return Err(ModelError::format(root, "--seq-len must be at least 2"));
    }
    let dir = split_dir(root, split)?;
    let held = match split {
        Split::Test => None,
        _ => Some(Held::new(root, heldout)?),
    };
    let mut pending: Vec<u32> = Vec::with_capacity(seq_len);
    let want = max.unwrap_or(usize::MAX);
    let (mut given, mut index, mut starts) = (0, 0, true);
    let mut skipping = false;
    documents(&dir, |text, last| {
        if starts {
            let document = index;
            index += 1;
            skipping = held
                .as_ref()
                .is_some_and(|h| h.contains(document) != (split == Split::Heldout));
        }
        starts = last;
        if skipping {
            return Ok(true);
        }
        let encoding = tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::format(&dir, format!("tokenizer: {e}")))?;
        let end = last.then_some(&eos);
        for &id in encoding.get_ids().iter().chain(end) {
            pending.push(id);
            if pending.len() == seq_len {
                given += 1;
                let window = std::mem::replace(&mut pending, Vec::with_capacity(seq_len));
                if !each(window)? || given == want {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    })?;
    Ok(given)
}

/// The error of a split without one whole window.
fn no_window(root: &Path, split: Split, seq_len: usize) -> ModelError {
    let which = match split {
        Split::Train => "training documents",
        Split::Heldout => "held-out documents",
        Split::Test => "text",
    };
    let dir = split_dir(root, split).unwrap_or_else(|_| root.to_path_buf());
    ModelError::format(
        &dir,
        format!("not one window of {seq_len} tokens in its {which}"),
    )
}

/// The first `max` windows (all, when `None`) of [`visit_windows`], held in memory; an error
/// when there is not one.
pub fn windows(
    root: &Path,
    (split, heldout): (Split, &Heldout),
    tokenizer: &tokenizers::Tokenizer,
    eos: u32,
    seq_len: usize,
    max: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    visit_windows(
        root,
        (split, heldout),
        (tokenizer, eos),
        seq_len,
        max,
        |w| {
            out.push(w);
            Ok(true)
        },
    )?;
    if out.is_empty() {
        return Err(no_window(root, split, seq_len));
    }
    Ok(out)
}

/// Windows of tokens read by index: held in memory, or in a [`TokenFile`].
pub trait Windows: Sync {
    /// How many windows.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Tokens per window; `None` when there is no window or their lengths differ.
    fn window_len(&self) -> Option<usize>;
    /// The windows `rows`, one after another.
    fn read(&self, rows: &[usize]) -> Result<Vec<u32>>;
}

impl Windows for [Vec<u32>] {
    fn len(&self) -> usize {
        <[Vec<u32>]>::len(self)
    }
    fn window_len(&self) -> Option<usize> {
        let t = self.first()?.len();
        self.iter().all(|w| w.len() == t).then_some(t)
    }
    fn read(&self, rows: &[usize]) -> Result<Vec<u32>> {
        Ok(rows.iter().flat_map(|&r| self[r].iter().copied()).collect())
    }
}

impl Windows for Vec<Vec<u32>> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn window_len(&self) -> Option<usize> {
        self.as_slice().window_len()
    }
    fn read(&self, rows: &[usize]) -> Result<Vec<u32>> {
        self.as_slice().read(rows)
    }
}

/// Windows of one length in a file of little-endian u32 tokens, one window after another; the
/// file is removed when this is dropped.
pub struct TokenFile {
    path: PathBuf,
    file: std::fs::File,
    window_len: usize,
    len: usize,
}

impl TokenFile {
    /// `windows` (of one length) written to the new file `path`.
    pub fn create(path: &Path, windows: &[Vec<u32>]) -> Result<Self> {
        let window_len = windows.window_len().unwrap_or(0);
        if windows.window_len().is_none() {
            return Err(ModelError::format(path, "windows of one length are needed"));
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| ModelError::io(path, e))?;
        let bytes: Vec<u8> = windows
            .iter()
            .flatten()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        file.write_all(&bytes)
            .map_err(|e| ModelError::io(path, e))?;
        Ok(TokenFile {
            path: path.to_path_buf(),
            file,
            window_len,
            len: windows.len(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Windows for TokenFile {
    fn len(&self) -> usize {
        self.len
    }
    fn window_len(&self) -> Option<usize> {
        (self.len > 0).then_some(self.window_len)
    }
    fn read(&self, rows: &[usize]) -> Result<Vec<u32>> {
        use std::os::unix::fs::FileExt;
        let t = self.window_len;
        let mut bytes = vec![0u8; 4 * t];
        let mut out = Vec::with_capacity(rows.len() * t);
        for &r in rows {
            if r >= self.len {
                return Err(ModelError::format(
                    &self.path,
                    format!("window {r} of {}", self.len),
                ));
            }
            self.file
                .read_exact_at(&mut bytes, (r * 4 * t) as u64)
                .map_err(|e| ModelError::io(&self.path, e))?;
            out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(out)
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Windows read again and again: in memory, or spilled to a file.
pub enum SpillableWindows {
    Memory(Vec<Vec<u32>>),
    File(TokenFile),
}

impl Windows for SpillableWindows {
    fn len(&self) -> usize {
        match self {
            SpillableWindows::Memory(w) => w.len(),
            SpillableWindows::File(f) => f.len,
        }
    }
    fn window_len(&self) -> Option<usize> {
        match self {
            SpillableWindows::Memory(w) => w.window_len(),
            SpillableWindows::File(f) => f.window_len(),
        }
    }
    fn read(&self, rows: &[usize]) -> Result<Vec<u32>> {
        match self {
            SpillableWindows::Memory(w) => w.read(rows),
            SpillableWindows::File(f) => f.read(rows),
        }
    }
}

/// The windows of [`visit_windows`] for a run that reads them again and again (training, in a
/// new order every epoch, and the held-out scoring after it): held in memory while they take at
/// most `memory` bytes, else every window written to `spill` (a new file, removed when the
/// result is dropped) and read back by index, so the memory held does not grow with the corpus.
/// An error when there is not one window.
pub fn spillable_windows(
    root: &Path,
    (split, heldout): (Split, &Heldout),
    (tokenizer, eos): (&tokenizers::Tokenizer, u32),
    (seq_len, max): (usize, Option<usize>),
    (spill, memory): (&Path, usize),
) -> Result<SpillableWindows> {
    let mut held: Vec<Vec<u32>> = Vec::new();
    let mut writer: Option<std::io::BufWriter<std::fs::File>> = None;
    let write = |w: &mut std::io::BufWriter<std::fs::File>, window: &[u32]| -> Result<()> {
        let bytes: Vec<u8> = window.iter().flat_map(|t| t.to_le_bytes()).collect();
        w.write_all(&bytes).map_err(|e| ModelError::io(spill, e))
    };
    let visited = visit_windows(
        root,
        (split, heldout),
        (tokenizer, eos),
        seq_len,
        max,
        |window| {
            if writer.is_none() && (held.len() + 1) * seq_len * 4 > memory {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(spill)
                    .map_err(|e| ModelError::io(spill, e))?;
                let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
                for h in std::mem::take(&mut held) {
                    write(&mut w, &h)?;
                }
                writer = Some(w);
            }
            match &mut writer {
                Some(w) => write(w, &window)?,
                None => held.push(window),
            }
            Ok(true)
        },
    );
    let spilled = writer.map(|w| {
        w.into_inner()
            .map_err(|e| ModelError::io(spill, e.into_error()))
    });
    let (count, spilled) = match (visited, spilled) {
        (Ok(count), None) => (count, None),
        (Ok(count), Some(Ok(file))) => (count, Some(file)),
        (visited, spilled) => {
            if spilled.is_some() {
                let _ = std::fs::remove_file(spill);
            }
            return Err(visited
                .err()
                .or_else(|| spilled.and_then(|s| s.err()))
                .expect("an error"));
        }
    };
    if count == 0 {
        return Err(no_window(root, split, seq_len));
    }
    Ok(match spilled {
        None => SpillableWindows::Memory(held),
        Some(file) => SpillableWindows::File(TokenFile {
            path: spill.to_path_buf(),
            file,
            window_len: seq_len,
            len: count,
        }),
    })
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
