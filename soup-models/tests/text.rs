//! Text data sets streamed: a document longer than a piece is tokenised piece by piece to the
//! windows the whole text gives, and a training split spilled to a file of tokens reads back the
//! windows held in memory would be.

use std::path::Path;

use soup_models::data::text::{
    spillable_windows, visit_windows, windows, SpillableWindows, Windows, PIECE_BYTES,
};
use soup_models::data::{Heldout, Split};
use soup_models::testkit::fixtures::ScratchDir;

const WORDS: [&str; 6] = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"];

/// A word-level tokenizer over [`WORDS`] (ids 2 …), `<unk>` 0 and the end token 1.
fn tokenizer() -> tokenizers::Tokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = ["<unk>", "</s>"]
        .iter()
        .chain(WORDS.iter())
        .enumerate()
        .map(|(i, w)| (w.to_string(), i.into()))
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    json.to_string().parse().unwrap()
}

/// `n` words drawn from [`WORDS`], ten to a line.
fn text(n: usize, seed: u64) -> String {
    let mut rng = soup_core::rng::SplitMix64::new(seed);
    let mut out = String::new();
    for i in 0..n {
        out.push_str(WORDS[rng.below(WORDS.len())]);
        out.push(if i % 10 == 9 { '\n' } else { ' ' });
    }
    out
}

/// The windows of `seq_len` of documents tokenised whole, each followed by the end token.
fn packed(documents: &[String], seq_len: usize) -> Vec<Vec<u32>> {
    let t = tokenizer();
    let ids: Vec<u32> = documents
        .iter()
        .flat_map(|d| {
            let mut ids = t.encode(d.as_str(), false).unwrap().get_ids().to_vec();
            ids.push(1);
            ids
        })
        .collect();
    ids.chunks_exact(seq_len).map(<[u32]>::to_vec).collect()
}

fn write(root: &Path, split: &str, documents: &[String]) {
    std::fs::create_dir_all(root.join(split)).unwrap();
    for (i, d) in documents.iter().enumerate() {
        std::fs::write(root.join(split).join(format!("{i:02}.txt")), d).unwrap();
    }
}

#[test]
fn a_document_longer_than_a_piece_gives_the_windows_of_the_whole_text() {
    let dir = ScratchDir::new("text-pieces");
    // Three documents, the middle one several pieces long.
    let documents = vec![text(50, 1), text(PIECE_BYTES / 2, 2), text(70, 3)];
    assert!(documents[1].len() > 2 * PIECE_BYTES);
    write(dir.path(), "test", &documents);
    let heldout = Heldout::Fraction {
        fraction: 0.1,
        seed: 0,
    };
    let t = tokenizer();
    let ours = windows(dir.path(), (Split::Test, &heldout), &t, 1, 16, None).unwrap();
    let whole = packed(&documents, 16);
    assert_eq!(ours.len(), whole.len());
    assert!(ours == whole, "the windows differ from the whole text's");
    // A document read in pieces is one document of the held-out split's count: an index file
    // holding out document 2 holds out the third.
    write(dir.path(), "train", &documents);
    let index = dir.path().join("heldout.txt");
    std::fs::write(&index, "2\n").unwrap();
    let listed = Heldout::IndexFile(index);
    let held = windows(dir.path(), (Split::Heldout, &listed), &t, 1, 16, None).unwrap();
    assert!(
        held == packed(&documents[2..], 16),
        "the held-out windows differ"
    );
    let train = windows(dir.path(), (Split::Train, &listed), &t, 1, 16, None).unwrap();
    assert!(
        train == packed(&documents[..2], 16),
        "the training windows differ"
    );
    // Visiting stops at `max`, and when told to.
    let mut seen = 0;
    let n = visit_windows(
        dir.path(),
        (Split::Test, &heldout),
        (&t, 1),
        16,
        Some(5),
        |_| {
            seen += 1;
            Ok(true)
        },
    )
    .unwrap();
    assert_eq!((n, seen), (5, 5));
    let n = visit_windows(
        dir.path(),
        (Split::Test, &heldout),
        (&t, 1),
        16,
        None,
        |_| Ok(false),
    )
    .unwrap();
    assert_eq!(n, 1);
    // Bytes that are not UTF-8 in a later piece: the file is named.
    let mut bad = documents[1].clone().into_bytes();
    let at = bad.len() - 100;
    bad[at] = 0xff;
    std::fs::write(dir.path().join("test/01.txt"), bad).unwrap();
    let err = windows(dir.path(), (Split::Test, &heldout), &t, 1, 16, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("01.txt") && err.contains("not UTF-8"), "{err}");
}

#[test]
fn spillable_windows_spilled_to_a_file_read_back_as_held_in_memory() {
    let dir = ScratchDir::new("text-spill");
    let documents: Vec<String> = (0..30).map(|i| text(40 + i, 10 + i as u64)).collect();
    write(dir.path(), "train", &documents);
    let heldout = Heldout::Fraction {
        fraction: 0.2,
        seed: 5,
    };
    let t = tokenizer();
    let split = (Split::Train, &heldout);
    let want = windows(dir.path(), split, &t, 1, 12, None).unwrap();
    let spill = dir.path().join("train.tokens");
    let held =
        spillable_windows(dir.path(), split, (&t, 1), (12, None), (&spill, 1 << 30)).unwrap();
    assert!(matches!(held, SpillableWindows::Memory(_)));
    assert!(!spill.exists());
    // A budget below the windows' bytes writes every window to the file.
    let budget = 4 * 12 * want.len() / 2;
    let spilled =
        spillable_windows(dir.path(), split, (&t, 1), (12, None), (&spill, budget)).unwrap();
    assert!(matches!(spilled, SpillableWindows::File(_)));
    assert!(spill.is_file());
    assert_eq!(
        std::fs::metadata(&spill).unwrap().len(),
        (4 * 12 * want.len()) as u64
    );
    for w in [&held, &spilled] {
        assert_eq!(w.len(), want.len());
        assert_eq!(w.window_len(), Some(12));
        let rows: Vec<usize> = (0..want.len()).rev().collect();
        let flat: Vec<u32> = rows.iter().flat_map(|&r| want[r].clone()).collect();
        assert_eq!(w.read(&rows).unwrap(), flat);
    }
    assert!(spilled.read(&[want.len()]).is_err());
    drop(spilled);
    assert!(
        !spill.exists(),
        "the file of tokens is removed when dropped"
    );
    // `max` bounds the windows, spilled or not; an existing file is not overwritten.
    let few = spillable_windows(dir.path(), split, (&t, 1), (12, Some(3)), (&spill, 0)).unwrap();
    assert_eq!(few.len(), 3);
    assert_eq!(few.read(&[2]).unwrap(), want[2]);
    let err = spillable_windows(dir.path(), split, (&t, 1), (12, None), (&spill, 0))
        .err()
        .expect("the file exists")
        .to_string();
    assert!(err.contains("train.tokens"), "{err}");
    drop(few);
    // No window at all: the split is named, and nothing is left behind.
    let err = spillable_windows(dir.path(), split, (&t, 1), (100_000, None), (&spill, 0))
        .err()
        .expect("no window")
        .to_string();
    assert!(err.contains("not one window"), "{err}");
    assert!(!spill.exists());
}
