//! `soup mix` with the multi-task methods (spec §3.9) end to end: a tiny CLIP trained on
//! Fashion-MNIST is the base; two tasks are fine-tuned from it (Fashion-MNIST, and the same
//! images with their labels reversed, y → 9 − y, which needs a head of its own); the merges
//! keep each task's head.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use soup_models::checkpoint::write_model_dir;
use soup_models::data::{DataSpec, Split};
use soup_models::testkit::fixtures::{bits, ScratchDir};
use soup_models::Checkpoint;

mod common;
use common::{fails, json, ok};

const DATA: &str = "/usr/share/datasets/fashion-mnist";
const LIMIT: &str = "400";

struct Tasks {
    _dir: ScratchDir,
    root: PathBuf,
}

impl Tasks {
    fn path(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }
}

/// idx files of `images` with labels `labels`.
fn write_idx(dir: &Path, prefix: &str, raw: &soup_models::data::RawImages, labels: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    let n = raw.len() as u32;
    let mut images = 0x0803u32.to_be_bytes().to_vec();
    for d in [n, raw.height as u32, raw.width as u32] {
        images.extend_from_slice(&d.to_be_bytes());
    }
    images.extend_from_slice(&raw.pixels);
    let mut lab = 0x0801u32.to_be_bytes().to_vec();
    lab.extend_from_slice(&n.to_be_bytes());
    lab.extend_from_slice(labels);
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
}

/// The base, the reversed-label data set, and one fine-tune per task, made once.
fn tasks() -> &'static Tasks {
    static TASKS: OnceLock<Tasks> = OnceLock::new();
    TASKS.get_or_init(|| {
        assert!(
            Path::new(DATA).join("train-images-idx3-ubyte.gz").exists(),
            "Fashion-MNIST is missing from {DATA}: `cargo xtask ci` installs it"
        );
        let dir = ScratchDir::new("multitask");
        let root = dir.path().to_path_buf();
        let t = Tasks { _dir: dir, root };
        // The reversed task: 2,000 training and 400 test images.
        let spec = DataSpec::new(DATA);
        for (split, prefix, n) in [(Split::Test, "t10k", 400), (Split::Train, "train", 2000)] {
            let raw = spec.load(split).unwrap();
            let rows: Vec<usize> = (0..n).collect();
            let raw = raw.subset(&rows);
            let labels: Vec<u8> = raw.labels.iter().map(|&y| 9 - y as u8).collect();
            write_idx(&t.root.join("reversed"), prefix, &raw, &labels);
        }
        let config = t.root.join("tiny.json");
        std::fs::write(
            &config,
            r#"{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_channels": 1, "image_size": 28, "patch_size": 7,
                "projection_dim": 16}"#,
        )
        .unwrap();
        ok(&[
            "train",
            "--arch",
            "clip-vit",
            "--config",
            config.to_str().unwrap(),
            "--data",
            DATA,
            "--max-examples",
            LIMIT,
            "--epochs",
            "2",
            "--lr",
            "3e-3",
            "--out",
            &t.path("base"),
        ]);
        // Each task: a linear probe on the base, then the whole model from it.
        for (name, data) in [
            ("fmnist", DATA.to_string()),
            ("reversed", t.path("reversed")),
        ] {
            let probe = t.path(&format!("probe-{name}"));
            ok(&[
                "train",
                "--init",
                &t.path("base"),
                "--data",
                &data,
                "--max-examples",
                LIMIT,
                "--train-only",
                "classification_head",
                "--epochs",
                "3",
                "--lr",
                "1e-2",
                "--out",
                &probe,
            ]);
            ok(&[
                "train",
                "--init",
                &probe,
                "--data",
                &data,
                "--max-examples",
                LIMIT,
                "--epochs",
                "2",
                "--lr",
                "1e-3",
                "--out",
                &t.path(&format!("ft-{name}")),
            ]);
        }
        std::fs::write(
            t.root.join("zoo.toml"),
            "[[model]]\npath = \"ft-fmnist\"\n\n[[model]]\npath = \"ft-reversed\"\n",
        )
        .unwrap();
        t
    })
}

fn merge(t: &Tasks, method: &str, out: &str, extra: &[&str]) -> Vec<String> {
    let data = format!("{DATA},{}", t.path("reversed"));
    let mut args: Vec<String> = [
        "mix",
        "--method",
        method,
        "--base",
        &t.path("base"),
        "--zoo",
        &t.path("zoo.toml"),
        "--data",
        &data,
        "--max-examples",
        LIMIT,
        "--out",
        &t.path(out),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run(args: &[String]) -> String {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&a)
}

#[test]
fn every_multitask_method_merges_the_encoder_and_keeps_each_head() {
    let t = tasks();
    let ada = ["--inner-epochs", "2", "--lr", "1e-2", "--batch-size", "50"];
    for (method, out, extra) in [
        ("task-arithmetic", "ta", &[][..]),
        ("ties", "ties", &[][..]),
        ("adamerging", "ada", &ada[..]),
        (
            "adamerging+",
            "ada-plus-b1",
            &[&ada[..], &["--model-batch", "1"]].concat()[..],
        ),
    ] {
        let stdout = run(&merge(t, method, out, extra));
        assert!(stdout.contains("mean test accuracy"), "{stdout}");
        let report = json(t.root.join(out).join("report.json"));
        assert_eq!(report["method"], method);
        let tasks = report["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 2);
        // Fashion-MNIST is learnt by the merged encoder with its own head: above chance (10 %).
        assert!(
            tasks[0]["test"]["accuracy"].as_f64().unwrap() > 0.2,
            "{method}: {}",
            tasks[0]
        );
        // Each task's reported accuracy is that of the merged encoder with that task's head, as
        // `soup eval` measures the model assembled from encoder.safetensors and the fine-tune's
        // head.
        for (k, (ft, data)) in [
            ("ft-fmnist", DATA.to_string()),
            ("ft-reversed", t.path("reversed")),
        ]
        .iter()
        .enumerate()
        {
            let ckpt = Checkpoint::open(t.root.join(ft).join("model.safetensors")).unwrap();
            let arch = ckpt.architecture().unwrap();
            let encoder = Checkpoint::open(t.root.join(out).join("encoder.safetensors")).unwrap();
            let head = arch.head_tensors();
            let params: Vec<_> = arch
                .layout()
                .tensors
                .iter()
                .map(|spec| {
                    if head.contains(&spec.name) {
                        ckpt.load(&spec.name, &Device::Cpu).unwrap()
                    } else {
                        encoder.load(&spec.name, &Device::Cpu).unwrap()
                    }
                })
                .collect();
            let dir = t.root.join(format!("{out}-task{k}"));
            write_model_dir(&dir, arch.as_ref(), &params, &Default::default(), "").unwrap();
            let eval = ok(&[
                "eval",
                "--model",
                dir.to_str().unwrap(),
                "--data",
                data,
                "--max-examples",
                LIMIT,
                "--json",
            ]);
            let eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
            assert_eq!(
                eval["accuracy"], tasks[k]["test"]["accuracy"],
                "{method}: task {k}"
            );
            assert_eq!(eval["count"], tasks[k]["test"]["count"]);
        }
        let mean = report["mean_test_accuracy"].as_f64().unwrap();
        let want = tasks
            .iter()
            .map(|t| t["test"]["accuracy"].as_f64().unwrap())
            .sum::<f64>()
            / 2.0;
        assert!((mean - want).abs() < 1e-12);
        // The heads are the fine-tunes' own, bit for bit.
        let heads = Checkpoint::open(t.root.join(out).join("heads.safetensors")).unwrap();
        for (k, ft) in ["ft-fmnist", "ft-reversed"].iter().enumerate() {
            let ckpt = Checkpoint::open(t.root.join(ft).join("model.safetensors")).unwrap();
            for name in ["classification_head.weight", "classification_head.bias"] {
                let a = heads
                    .load(&format!("task.{k}.{name}"), &Device::Cpu)
                    .unwrap();
                let b = ckpt.load(name, &Device::Cpu).unwrap();
                assert_eq!(bits(&[a]), bits(&[b]), "{method}: task {k} {name}");
            }
        }
        // α: every block sums to 1; the task models' λ stay in [0, 1] for AdaMerging.
        let coefficients = json(t.root.join(out).join("coefficients.json"));
        assert_eq!(coefficients["models"].as_array().unwrap().len(), 3);
        for row in coefficients["alpha"].as_array().unwrap() {
            let row: Vec<f64> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            if method != "ties" {
                assert!(
                    (row.iter().sum::<f64>() - 1.0).abs() < 1e-9,
                    "{method}: {row:?}"
                );
            }
            if method.starts_with("adamerging") {
                assert!(row[1..].iter().all(|l| (0.0..=1.0).contains(l)), "{row:?}");
            }
        }
        if method.starts_with("adamerging") {
            assert!(report["steps"].as_u64().unwrap() > 0);
        } else {
            assert_eq!(report["lambda_grid"].as_array().unwrap().len(), 10);
        }
        assert!(std::fs::read_to_string(t.root.join(out).join("report.md"))
            .unwrap()
            .contains("| test |"));
    }
    // Layer-wise through model batches of one: b = 1 holds one direction.
    let report = json(t.root.join("ada-plus-b1").join("report.json"));
    assert_eq!(report["model_batch"], 1);
}

#[test]
fn a_multitask_merge_is_deterministic() {
    let t = tasks();
    let extra = ["--inner-epochs", "1", "--lr", "1e-2", "--batch-size", "100"];
    run(&merge(t, "adamerging+", "det-a", &extra));
    run(&merge(t, "adamerging+", "det-b", &extra));
    let a = std::fs::read(t.root.join("det-a/encoder.safetensors")).unwrap();
    let b = std::fs::read(t.root.join("det-b/encoder.safetensors")).unwrap();
    assert!(a == b, "the same inputs and seed gave different encoders");
}

#[test]
fn multitask_input_errors_exit_with_two() {
    let t = tasks();
    let data = format!("{DATA},{}", t.path("reversed"));
    fails(
        &[
            "mix",
            "--method",
            "adamerging",
            "--zoo",
            &t.path("zoo.toml"),
            "--data",
            &data,
            "--out",
            &t.path("no-base"),
        ],
        "--base",
    );
    fails(
        &[
            "mix",
            "--method",
            "ties",
            "--base",
            &t.path("base"),
            "--zoo",
            &t.path("zoo.toml"),
            "--data",
            DATA,
            "--out",
            &t.path("one-data"),
        ],
        "1 data set(s) for 2 task model(s)",
    );
    fails(
        &[
            "mix",
            "--method",
            "mehl",
            "--base",
            &t.path("base"),
            "--zoo",
            &t.path("zoo.toml"),
            "--data",
            DATA,
            "--out",
            &t.path("mehl-base"),
        ],
        "--base is for the multi-task methods",
    );
    fails(
        &[
            "mix",
            "--method",
            "mehl",
            "--prior",
            "0.5",
            "--zoo",
            &t.path("zoo.toml"),
            "--data",
            DATA,
            "--out",
            &t.path("mehl-prior"),
        ],
        "--prior",
    );
    fails(
        &[
            "mix",
            "--method",
            "ties",
            "--density",
            "1.5",
            "--base",
            &t.path("base"),
            "--zoo",
            &t.path("zoo.toml"),
            "--data",
            &data,
            "--out",
            &t.path("bad-density"),
        ],
        "--density",
    );
    for out in [
        "no-base",
        "one-data",
        "mehl-base",
        "mehl-prior",
        "bad-density",
    ] {
        assert!(!t.root.join(out).exists());
        assert!(
            !t.root.join(format!("{out}.partial")).exists(),
            "{out}.partial left"
        );
    }
}
