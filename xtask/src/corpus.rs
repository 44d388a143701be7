//! `cargo xtask bench --only corpus`: the memory of a language model's text pipeline on a 2 GB
//! corpus. A tiny llama with a word-level tokenizer (the model costs next to nothing, so the
//! data path is what is measured) is trained for one epoch on 2 GB of training text, its windows
//! spilled to a file of tokens (`--window-memory 100M`), and scored on a 2 GB test split that is
//! one document (read in pieces); the peak RSS of each process, by GNU time.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::reproduce::{strings, Soup};
use crate::{ensure_packages, root};

/// Bytes of each split.
const SPLIT_BYTES: u64 = 2_000_000_000;
/// Training documents (the held-out split is a tenth of them).
const DOCUMENTS: u64 = 200;
/// Tokens per window, and windows per training step.
const SEQ_LEN: usize = 256;
const BATCH: usize = 512;

/// The vocabulary: 64 words of 11 letters (ids 2 …).
fn words() -> Vec<String> {
    (0..64)
        .map(|i| {
            (0..11)
                .map(|j| (b'a' + ((i * 7 + j * 3 + i * j) % 26) as u8) as char)
                .collect()
        })
        .collect()
}

/// Writes `bytes` of words drawn by xorshift from `seed`, twelve to a line, to `path`.
fn write_text(path: &Path, bytes: u64, seed: u64) -> Result<(), String> {
    let words = words();
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut x = seed | 1;
    let mut written = 0u64;
    let mut line = 0;
    while written < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let word = &words[(x % words.len() as u64) as usize];
        line += 1;
        let end = if line % 12 == 0 { b"\n" } else { b" " };
        w.write_all(word.as_bytes())
            .and_then(|()| w.write_all(end))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        written += word.len() as u64 + 1;
    }
    w.flush().map_err(|e| format!("{}: {e}", path.display()))
}

/// The corpus (cached): `train/` of [`DOCUMENTS`] files, `test/` of one file.
fn corpus(dir: &Path) -> Result<PathBuf, String> {
    let data = dir.join("data");
    let done = data.join("complete");
    if done.is_file() {
        return Ok(data);
    }
    let _ = std::fs::remove_dir_all(&data);
    for split in ["train", "test"] {
        std::fs::create_dir_all(data.join(split)).map_err(|e| e.to_string())?;
    }
    eprintln!("xtask: writing a corpus of 2 × {SPLIT_BYTES} bytes");
    for d in 0..DOCUMENTS {
        let path = data.join(format!("train/part-{d:03}.txt"));
        write_text(&path, SPLIT_BYTES / DOCUMENTS, 1000 + d)?;
    }
    write_text(&data.join("test/all.txt"), SPLIT_BYTES, 7)?;
    std::fs::write(&done, "").map_err(|e| e.to_string())?;
    Ok(data)
}

/// A model directory's tokenizer files for [`words`]: word level, `<unk>` 0, `</s>` 1.
fn tokenizer(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), 0.into());
    vocab.insert("</s>".into(), 1.into());
    for (i, w) in words().iter().enumerate() {
        vocab.insert(w.clone(), (i + 2).into());
    }
    let files = [
        (
            "tokenizer.json",
            json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
                "post_processor": null, "decoder": null,
                "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}),
        ),
        (
            "tokenizer_config.json",
            json!({"eos_token": "</s>", "unk_token": "<unk>"}),
        ),
        ("generation_config.json", json!({"eos_token_id": 1})),
    ];
    for (name, value) in files {
        std::fs::write(dir.join(name), value.to_string()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The section: (JSON, markdown table).
pub(crate) fn corpus_memory() -> Result<(Value, String), String> {
    ensure_packages(&[("time", "/usr/bin/time")])?;
    // The build the language-model preset runs (BENCHMARKS.md: OpenBLAS is faster there).
    ensure_packages(crate::OPENBLAS_PACKAGES)?;
    let soup = Soup::build(false, &["openblas"])?;
    let dir = root().join("target/bench/corpus");
    let data = corpus(&dir)?;
    let tok = dir.join("tokenizer");
    tokenizer(&tok)?;
    let config = dir.join("tiny.json");
    std::fs::write(
        &config,
        json!({"model_type": "llama", "vocab_size": 66, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": SEQ_LEN,
            "tie_word_embeddings": true})
        .to_string(),
    )
    .map_err(|e| e.to_string())?;
    let data_s = data.display().to_string();
    let mut rows = Vec::new();
    let mut table = String::from(
        "### Text pipeline on a 2 GB corpus: peak RSS\n\n\
         | command | what is held | wall (s) | peak RSS (GB) |\n|---|---|---|---|\n",
    );
    let model = dir.join("model");
    // The default --window-memory (1G) would hold this corpus's 0.6 GB of tokens.
    {
        let (label, memory) = ("windows spilled to a file", "100M");
        let out = dir.join("model-100m");
        let _ = std::fs::remove_dir_all(&out);
        let mut cmd = vec![soup.exe().display().to_string()];
        cmd.extend(strings(&[
            "train",
            "--arch",
            "llama",
            "--config",
            &config.display().to_string(),
            "--tokenizer",
            &tok.display().to_string(),
            "--data",
            &data_s,
            "--seq-len",
            &SEQ_LEN.to_string(),
            "--batch-size",
            &BATCH.to_string(),
            "--epochs",
            "1",
            "--lr",
            "3e-3",
            "--window-memory",
            memory,
            "-q",
            "--out",
            &out.display().to_string(),
        ]));
        eprintln!("xtask: {label}");
        let (wall, rss, said) = super::bench::timed(&cmd, &dir.join("time.log"))?;
        eprint!("{said}");
        table.push_str(&format!(
            "| `soup train` (2 GB of training text, one epoch) | {label} (`--window-memory {memory}`) | {wall:.0} | {:.2} |\n",
            rss / 1e9
        ));
        rows.push(json!({"command": "train", "window_memory": memory, "wall_s": wall, "peak_rss_bytes": rss}));
        let _ = std::fs::remove_dir_all(&model);
        std::fs::rename(&out, &model).map_err(|e| e.to_string())?;
    }
    let mut cmd = vec![soup.exe().display().to_string()];
    cmd.extend(strings(&[
        "eval",
        "--model",
        &model.display().to_string(),
        "--data",
        &data_s,
        "--seq-len",
        &SEQ_LEN.to_string(),
        "--json",
    ]));
    eprintln!("xtask: eval on the 2 GB test document");
    let (wall, rss, said) = super::bench::timed(&cmd, &dir.join("time.log"))?;
    let scores: Value = serde_json::from_str(said.trim()).unwrap_or(Value::Null);
    table.push_str(&format!(
        "| `soup eval` (a 2 GB test document, {} windows) | a batch of windows | {wall:.0} | {:.2} |\n",
        scores["windows"],
        rss / 1e9
    ));
    rows.push(json!({"command": "eval", "wall_s": wall, "peak_rss_bytes": rss, "scores": scores}));
    Ok((json!(rows), table))
}
