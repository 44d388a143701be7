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
            "adamerging+",
            "--directions",
            "difference",
            "--base",
            &t.path("base"),
            "--zoo",
            &t.path("zoo.toml"),
            "--data",
            &data,
            "--out",
            &t.path("ada-directions"),
        ],
        "--directions is a setting of mehl and mehl+",
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
        "ada-directions",
        "bad-density",
    ] {
        assert!(!t.root.join(out).exists());
        assert!(
            !t.root.join(format!("{out}.partial")).exists(),
            "{out}.partial left"
        );
    }
}

/// `soup mix` with `--mergekit-config CONFIG` instead of `--method`.
fn merge_config(t: &Tasks, config: &str, yaml: &str, out: &str) -> Vec<String> {
    std::fs::write(t.root.join(config), yaml).unwrap();
    let mut args = merge(t, "-", out, &[]);
    // `merge` names a method; a configuration replaces it.
    let at = args.iter().position(|a| a == "--method").unwrap();
    args.drain(at..at + 2);
    args.extend(["--mergekit-config".to_string(), t.path(config)]);
    args
}

/// The encoder tensors of a multi-task output, by name.
fn encoder(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let ckpt = Checkpoint::open(dir.join("encoder.safetensors")).unwrap();
    let names: Vec<String> = ckpt.names().map(str::to_string).collect();
    names
        .into_iter()
        .map(|name| {
            let t = ckpt.load(&name, &Device::Cpu).unwrap();
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (name, v)
        })
        .collect()
}

#[test]
fn a_mergekit_configuration_merges_the_task_encoders_and_keeps_each_head() {
    let t = tasks();
    let (fm, rev, base) = (t.path("ft-fmnist"), t.path("ft-reversed"), t.path("base"));
    // Linear with the models listed against the zoo's order and weighted 1 : 3: each encoder
    // tensor is (θ_fmnist + 3 θ_reversed) / 4, whatever order the configuration lists them in.
    run(&merge_config(
        t,
        "linear.yml",
        &format!(
            "merge_method: linear\nmodels:\n  - model: {rev}\n    parameters: {{weight: 3.0}}\n  - model: {fm}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
        ),
        "mk-linear",
    ));
    let merged = encoder(&t.root.join("mk-linear"));
    assert!(merged.len() > 10);
    let (a, b) = (
        Checkpoint::open(t.root.join("ft-fmnist/model.safetensors")).unwrap(),
        Checkpoint::open(t.root.join("ft-reversed/model.safetensors")).unwrap(),
    );
    for (name, m) in &merged {
        let x = a.load(name, &Device::Cpu).unwrap().flatten_all().unwrap();
        let y = b.load(name, &Device::Cpu).unwrap().flatten_all().unwrap();
        let (x, y) = (x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
        for ((m, x), y) in m.iter().zip(&x).zip(&y) {
            let want = (*x as f64 + 3.0 * *y as f64) / 4.0;
            assert!(
                (*m as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{name}"
            );
        }
    }
    let report = json(t.root.join("mk-linear/report.json"));
    assert_eq!(report["method"], "linear");
    assert!(report["mergekit_config"]
        .as_str()
        .unwrap()
        .contains("linear"));
    assert_eq!(report["tasks"].as_array().unwrap().len(), 2);
    assert!(t.root.join("mk-linear/mergekit_config.yml").is_file());
    assert!(!t.root.join("mk-linear/coefficients.json").exists());
    let heads = Checkpoint::open(t.root.join("mk-linear/heads.safetensors")).unwrap();
    let ckpt = Checkpoint::open(t.root.join("ft-reversed/model.safetensors")).unwrap();
    let name = "classification_head.weight";
    assert_eq!(
        bits(&[heads.load(&format!("task.1.{name}"), &Device::Cpu).unwrap()]),
        bits(&[ckpt.load(name, &Device::Cpu).unwrap()])
    );

    // Data-free task arithmetic at the λ soup's task arithmetic chose on held-out data gives
    // the same encoder.
    run(&merge(t, "task-arithmetic", "ta-for-mk", &[]));
    let report = json(t.root.join("ta-for-mk/report.json"));
    let lambda = json(t.root.join("ta-for-mk/coefficients.json"))["alpha"][0][1]
        .as_f64()
        .unwrap();
    assert!(report["lambda_grid"].as_array().unwrap().len() == 10);
    run(&merge_config(
        t,
        "ta.yml",
        &format!(
            "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {fm}\n    parameters: {{weight: 1.0}}\n  - model: {rev}\n    parameters: {{weight: 1.0}}\nparameters: {{lambda: {lambda}}}\n"
        ),
        "mk-ta",
    ));
    let (soup, mk) = (
        encoder(&t.root.join("ta-for-mk")),
        encoder(&t.root.join("mk-ta")),
    );
    assert_eq!(soup.len(), mk.len());
    for ((n, s), (_, m)) in soup.iter().zip(&mk) {
        for (s, m) in s.iter().zip(m) {
            assert!((s - m).abs() <= 1e-6 * (1.0 + s.abs()), "{n}: {s} vs {m}");
        }
    }
    let ta = json(t.root.join("ta-for-mk/report.json"));
    let mk = json(t.root.join("mk-ta/report.json"));
    assert_eq!(ta["mean_test_accuracy"], mk["mean_test_accuracy"]);

    // TIES per tensor runs and is scored per task.
    let stdout = run(&merge_config(
        t,
        "ties.yml",
        &format!(
            "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {fm}\n    parameters: {{weight: 1.0, density: 0.2}}\n  - model: {rev}\n    parameters: {{weight: 1.0, density: 0.2}}\nparameters: {{normalize: true}}\n"
        ),
        "mk-ties",
    ));
    assert!(stdout.starts_with("ties: base + 2 task models"), "{stdout}");
    assert!(std::fs::read_to_string(t.root.join("mk-ties/report.md"))
        .unwrap()
        .contains("mergekit configuration"));
}

#[test]
fn a_mergekit_configuration_that_does_not_match_the_zoo_is_refused() {
    let t = tasks();
    let (fm, rev, base) = (t.path("ft-fmnist"), t.path("ft-reversed"), t.path("base"));
    let probe = t.path("probe-fmnist");
    let ta = |models: &[&str], base_model: &str, extra: &str| {
        let mut y = format!("merge_method: task_arithmetic\nbase_model: {base_model}\nmodels:\n");
        for m in models {
            y.push_str(&format!(
                "  - model: {m}\n    parameters: {{weight: 1.0}}\n"
            ));
        }
        y.push_str(extra);
        y
    };
    let cases = [
        (
            "mk-stranger",
            ta(&[&fm, &probe], &base, ""),
            "neither --base nor a model of the zoo",
        ),
        (
            "mk-missing",
            ta(&[&fm], &base, ""),
            "is not among its models",
        ),
        (
            "mk-other-base",
            ta(&[&fm, &rev], &probe, ""),
            "is not --base",
        ),
        (
            "mk-f16",
            ta(&[&fm, &rev], &base, "dtype: float16\n"),
            "float32",
        ),
        (
            "mk-slices",
            ta(&[&fm, &rev], &base, "slices: []\n"),
            "slices",
        ),
    ];
    for (out, yaml, what) in &cases {
        let args = merge_config(t, &format!("{out}.yml"), yaml, out);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&a, what);
    }
    // --method and --mergekit-config together.
    let mut args = merge_config(t, "mk-both.yml", &ta(&[&fm, &rev], &base, ""), "mk-both");
    args.extend(["--method".to_string(), "ties".to_string()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&a, "--method");
    for out in cases.iter().map(|c| c.0).chain(["mk-both"]) {
        assert!(!t.root.join(out).exists(), "{out} written");
        assert!(
            !t.root.join(format!("{out}.partial")).exists(),
            "{out}.partial left"
        );
    }
}
