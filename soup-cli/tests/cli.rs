//! End to end on real data: Fashion-MNIST (Debian package `dataset-fashion-mnist`, which
//! `cargo xtask ci` installs) and a tiny CLIP: train → finetune → mix with every method → eval,
//! resume after a kill, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use candle_core::Device;
use soup_models::testkit::fixtures::{bits, ScratchDir};
use soup_models::Checkpoint;

const DATA: &str = "/usr/share/datasets/fashion-mnist";
/// Examples per split: enough to learn something, few enough for CI.
const LIMIT: &str = "600";

mod common;
use common::{fails, json, ok};

struct Zoo {
    _dir: ScratchDir,
    root: PathBuf,
}

impl Zoo {
    fn path(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }
}

/// A start point trained on Fashion-MNIST and six fine-tunes of it, made once per test run.
fn zoo() -> &'static Zoo {
    static ZOO: OnceLock<Zoo> = OnceLock::new();
    ZOO.get_or_init(|| {
        assert!(
            Path::new(DATA).join("train-images-idx3-ubyte.gz").exists(),
            "Fashion-MNIST is missing from {DATA}: `cargo xtask ci` installs it \
             (apt-get install dataset-fashion-mnist)"
        );
        let dir = ScratchDir::new("cli");
        let root = dir.path().to_path_buf();
        let config = root.join("tiny.json");
        std::fs::write(
            &config,
            r#"{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_channels": 1, "image_size": 28, "patch_size": 7,
                "projection_dim": 16}"#,
        )
        .unwrap();
        let search = root.join("search.toml");
        std::fs::write(
            &search,
            "lr = [3e-4, 3e-3]\nepochs = [1, 1]\nbatch_size = 32\n",
        )
        .unwrap();
        let zoo = Zoo { _dir: dir, root };
        let out = ok(&[
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
            &zoo.path("base.safetensors"),
        ]);
        assert!(out.contains("held-out accuracy"), "{out}");
        ok(&[
            "finetune",
            "--base",
            &zoo.path("base.safetensors"),
            "--data",
            DATA,
            "--max-examples",
            LIMIT,
            "--count",
            "6",
            "--search",
            search.to_str().unwrap(),
            "--out",
            &zoo.path("zoo"),
        ]);
        zoo
    })
}

fn mix(zoo: &Zoo, method: &str, out: &str, model_batch: &str) -> Vec<String> {
    [
        "mix",
        "--method",
        method,
        "--zoo",
        &zoo.path("zoo"),
        "--data",
        DATA,
        "--max-examples",
        LIMIT,
        "--out",
        &zoo.path(out),
        "--model-batch",
        model_batch,
        "--inner-epochs",
        "1",
        "--batch-size",
        "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn soup_bits(path: &str) -> Vec<u32> {
    let ckpt = Checkpoint::open(path).unwrap();
    let arch = ckpt.architecture().unwrap();
    bits(&ckpt.load_params(arch.as_ref(), &Device::Cpu).unwrap()).concat()
}

#[test]
fn every_method_writes_a_soup_that_eval_reproduces() {
    let zoo = zoo();
    for method in ["uniform", "greedy", "learned", "learned+", "mehl", "mehl+"] {
        let out = format!("out-{method}");
        let args = mix(zoo, method, &out, "2");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&args);
        for file in [
            "model.safetensors",
            "preprocessor_config.json",
            "README.md",
            "coefficients.json",
            "report.json",
            "coefficients.svg",
            "curve.svg",
            "recipe.toml",
            "config.json",
        ] {
            assert!(
                Path::new(&zoo.path(&out)).join(file).exists(),
                "{method}: no {file}"
            );
        }
        let coefficients = json(zoo.path(&format!("{out}/coefficients.json")));
        let rows = coefficients["alpha"].as_array().unwrap();
        assert_eq!(coefficients["models"].as_array().unwrap().len(), 6);
        assert_eq!(rows.len(), coefficients["blocks"].as_array().unwrap().len());
        for row in rows {
            let sum: f64 = row
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_f64().unwrap())
                .sum();
            assert!((sum - 1.0).abs() < 1e-6, "{method}: α sums to {sum}");
        }
        let report = json(zoo.path(&format!("{out}/report.json")));
        assert_eq!(report["method"], method);
        assert!(report["peak_rss_bytes"].as_u64().unwrap() > 0);
        let eval: serde_json::Value = serde_json::from_str(&ok(&[
            "eval",
            "--model",
            &zoo.path(&out),
            "--data",
            DATA,
            "--max-examples",
            LIMIT,
            "--split",
            "test",
            "--json",
        ]))
        .unwrap();
        assert_eq!(eval["accuracy"], report["test"]["accuracy"], "{method}");
        assert_eq!(eval["loss"], report["test"]["loss"], "{method}");
        // The model card names the method, and every source.
        let card = std::fs::read_to_string(zoo.path(&format!("{out}/README.md"))).unwrap();
        assert!(
            card.starts_with("---\nlibrary_name: transformers\n"),
            "{card}"
        );
        assert!(
            card.contains(&format!("# Soup: {method} of 6 models")),
            "{card}"
        );
        assert_eq!(card.matches("zoo/model-0").count(), 6, "{card}");
        assert!(
            std::fs::read_to_string(zoo.path(&format!("{out}/coefficients.svg")))
                .unwrap()
                .starts_with("<svg")
        );
    }
    // Per-example logits: their argmax is the accuracy eval reports.
    let logits_file = zoo.path("uniform-test-logits.safetensors");
    let eval: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        &zoo.path("out-uniform"),
        "--data",
        DATA,
        "--max-examples",
        LIMIT,
        "--json",
        "--save-logits",
        &logits_file,
    ]))
    .unwrap();
    let saved = candle_core::safetensors::load(&logits_file, &Device::Cpu).unwrap();
    let logits = &saved["logits"];
    let labels: Vec<u32> = saved["labels"].to_vec1().unwrap();
    assert_eq!(logits.dims(), &[600, 10]);
    assert_eq!(saved["features"].dims(), &[600, 16]);
    let predicted: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
    let correct = predicted
        .iter()
        .zip(&labels)
        .filter(|(p, l)| p == l)
        .count();
    assert_eq!(
        correct as f64 / 600.0,
        eval["accuracy"].as_f64().unwrap(),
        "argmax of the saved logits"
    );
    // Uniform is the mean of the checkpoints.
    let models: Vec<Vec<u32>> = (0..6)
        .map(|i| soup_bits(&zoo.path(&format!("zoo/model-{i:02}"))))
        .collect();
    let uniform = soup_bits(&zoo.path("out-uniform/model.safetensors"));
    for (k, u) in uniform.iter().enumerate() {
        let mean = models
            .iter()
            .map(|m| f32::from_bits(m[k]) as f64)
            .sum::<f64>()
            / 6.0;
        assert!((f32::from_bits(*u) as f64 - mean).abs() <= 1e-6 * mean.abs().max(1.0));
    }
    // The shifted test set: the test images under four corruptions.
    let shifted: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        &zoo.path("out-uniform/model.safetensors"),
        "--data",
        DATA,
        "--max-examples",
        LIMIT,
        "--shift",
        "all",
        "--json",
    ]))
    .unwrap();
    assert_eq!(shifted["count"], 4 * 600);
    let inspect = ok(&["inspect", &zoo.path("zoo")]);
    assert!(
        inspect.contains("zoo of 6 models") && inspect.contains("mehl+"),
        "{inspect}"
    );
}

#[test]
fn bf16_directions_halve_their_memory_and_keep_the_soup() {
    let zoo = zoo();
    let mut reports = Vec::new();
    for dtype in ["model", "bf16"] {
        let out = format!("directions-{dtype}");
        let mut args = mix(zoo, "mehl+", &out, "3");
        args.extend(["--direction-dtype".to_string(), dtype.to_string()]);
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let recipe = std::fs::read_to_string(zoo.path(&format!("{out}/recipe.toml"))).unwrap();
        assert!(
            recipe.contains(&format!("direction_dtype = \"{dtype}\"")),
            "{recipe}"
        );
        reports.push(json(zoo.path(&format!("{out}/report.json"))));
    }
    let directions =
        |r: &serde_json::Value| r["memory_account_bytes"]["directions"].as_u64().unwrap();
    assert_eq!(2 * directions(&reports[1]), directions(&reports[0]));
    // The same soup up to the rounding of the directions: test accuracy within 1 point.
    let test = |r: &serde_json::Value| r["test"]["accuracy"].as_f64().unwrap();
    assert!((test(&reports[0]) - test(&reports[1])).abs() <= 0.01);
    // The soup is recomputed from the models at the end: a timed phase of its own.
    assert!(reports[1]["timings_s"]["soup.recompute soup"]
        .as_f64()
        .is_some());
    assert!(reports[0]["timings_s"]["soup.recompute soup"].is_null());
}

/// `--directions difference` is recorded in the recipe and gives another soup whose α still sum
/// to 1 per block and stay nearer the average than the authors' unit directions' on this zoo
/// (the bound itself: verify's `difference_directions_bound_alpha_…`).
#[test]
fn difference_directions_are_recorded_and_keep_alpha_nearer_the_average() {
    let zoo = zoo();
    let mut largest = Vec::new();
    for directions in ["unit", "difference"] {
        let out = format!("directions-{directions}");
        let mut args = mix(zoo, "mehl+", &out, "3");
        args.extend(["--directions".to_string(), directions.to_string()]);
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let recipe = std::fs::read_to_string(zoo.path(&format!("{out}/recipe.toml"))).unwrap();
        assert!(
            recipe.contains(&format!("directions = \"{directions}\"")),
            "{recipe}"
        );
        let coefficients = json(zoo.path(&format!("{out}/coefficients.json")));
        let mut max = 0.0f64;
        for row in coefficients["alpha"].as_array().unwrap() {
            let row: Vec<f64> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_f64().unwrap())
                .collect();
            assert!((row.iter().sum::<f64>() - 1.0).abs() <= 1e-5, "{row:?}");
            max = row.iter().fold(max, |m, a| m.max(a.abs()));
        }
        largest.push(max);
    }
    assert!(
        largest[1] < largest[0],
        "max |α|, unit and difference: {largest:?}"
    );
    assert_ne!(
        soup_bits(&zoo.path("directions-unit/model.safetensors")),
        soup_bits(&zoo.path("directions-difference/model.safetensors"))
    );
}

/// `--device cpu` is the default, bit for bit; a GPU this build lacks is refused with a message
/// that says how to get one, before anything is written; `auto` falls back to the CPU.
#[test]
fn the_device_flag_defaults_to_the_cpu_and_refuses_cuda_without_the_feature() {
    let zoo = zoo();
    let mut default = mix(zoo, "mehl+", "device-default", "3");
    let mut cpu = mix(zoo, "mehl+", "device-cpu", "3");
    cpu.extend(["--device".to_string(), "cpu".to_string()]);
    let mut auto = mix(zoo, "mehl+", "device-auto", "3");
    auto.extend(["--device".to_string(), "auto".to_string()]);
    for args in [&mut default, &mut cpu, &mut auto] {
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let soup = soup_bits(&zoo.path("device-default/model.safetensors"));
    assert_eq!(soup, soup_bits(&zoo.path("device-cpu/model.safetensors")));
    assert_eq!(soup, soup_bits(&zoo.path("device-auto/model.safetensors")));
    let report = json(zoo.path("device-cpu/report.json"));
    assert_eq!(report["device"], "cpu");
    // A build with the feature `cuda` takes these devices instead (where a GPU is).
    if cfg!(feature = "cuda") {
        return;
    }
    for (device, what) in [
        (
            "cuda",
            "built without CUDA (build it with `--features cuda`)",
        ),
        ("cuda:1", "device cuda:1: this soup was built without CUDA"),
        (
            "tpu",
            "unknown device \"tpu\": expected cpu, cuda, cuda:N or auto",
        ),
    ] {
        let mut args = mix(zoo, "mehl+", "device-refused", "3");
        args.extend(["--device".to_string(), device.to_string()]);
        fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), what);
        assert!(!Path::new(&zoo.path("device-refused")).exists());
        assert!(!Path::new(&zoo.path("device-refused.partial")).exists());
    }
    let model = zoo.path("device-cpu/model.safetensors");
    for command in [
        vec![
            "eval", "--model", &model, "--data", DATA, "--device", "cuda",
        ],
        vec![
            "finetune",
            "--base",
            &model,
            "--data",
            DATA,
            "--count",
            "1",
            "--out",
            &zoo.path("device-refused"),
            "--device",
            "cuda",
        ],
        vec![
            "train",
            "--init",
            &model,
            "--data",
            DATA,
            "--out",
            &zoo.path("device-refused.safetensors"),
            "--device",
            "cuda",
        ],
    ] {
        fails(&command, "built without CUDA");
    }
}

#[test]
fn a_killed_run_resumes_to_the_same_soup() {
    let zoo = zoo();
    let full = mix(zoo, "mehl+", "resume-full", "1");
    ok(&full.iter().map(String::as_str).collect::<Vec<_>>());

    let killed = mix(zoo, "mehl+", "resume-killed", "1");
    let mut child = Command::new(env!("CARGO_BIN_EXE_soup"))
        .args(&killed)
        .arg("-q")
        .spawn()
        .unwrap();
    let progress = PathBuf::from(zoo.path("resume-killed.partial/progress.safetensors"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !progress.exists() {
        assert!(std::time::Instant::now() < deadline, "no progress saved");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !Path::new(&zoo.path("resume-killed")).exists(),
        "OUT must not exist before the run ends"
    );
    let mut resumed = killed.clone();
    resumed.push("--resume".into());
    ok(&resumed.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        soup_bits(&zoo.path("resume-full/model.safetensors")),
        soup_bits(&zoo.path("resume-killed/model.safetensors"))
    );
    assert_eq!(
        json(zoo.path("resume-full/coefficients.json")),
        json(zoo.path("resume-killed/coefficients.json"))
    );
}

#[test]
fn bad_input_gets_exit_code_two_and_a_named_culprit() {
    let zoo = zoo();
    let dir = ScratchDir::new("cli-bad");
    let p = |n: &str| dir.path().join(n).display().to_string();

    // A zoo with a corrupt checkpoint, and one whose models do not match.
    let corrupt = dir.path().join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    for i in 0..2 {
        let from = PathBuf::from(zoo.path(&format!("zoo/model-{i:02}/model.safetensors")));
        std::fs::copy(&from, corrupt.join(format!("m{i}.safetensors"))).unwrap();
    }
    let bytes = std::fs::read(corrupt.join("m1.safetensors")).unwrap();
    std::fs::write(corrupt.join("m1.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let mismatched = dir.path().join("mismatched");
    std::fs::create_dir_all(&mismatched).unwrap();
    std::fs::copy(
        zoo.path("zoo/model-00/model.safetensors"),
        mismatched.join("a.safetensors"),
    )
    .unwrap();
    let json_cfg = p("other.json");
    std::fs::write(&json_cfg, r#"{"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_channels": 1, "image_size": 28, "patch_size": 7, "projection_dim": 16}"#).unwrap();
    ok(&[
        "train",
        "--arch",
        "clip-vit",
        "--config",
        &json_cfg,
        "--data",
        DATA,
        "--max-examples",
        "64",
        "--out",
        &mismatched.join("b.safetensors").display().to_string(),
    ]);
    let empty_data = dir.path().join("empty-data");
    std::fs::create_dir_all(&empty_data).unwrap();

    let base = ["--data", DATA, "--max-examples", "64"];
    let with = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(base.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            with(&[
                "mix",
                "--method",
                "uniform",
                "--zoo",
                &p("absent"),
                "--out",
                &p("o1"),
            ]),
            "no such zoo",
        ),
        (
            with(&[
                "mix",
                "--method",
                "uniform",
                "--zoo",
                corrupt.to_str().unwrap(),
                "--out",
                &p("o2"),
            ]),
            "m1.safetensors",
        ),
        (
            with(&[
                "mix",
                "--method",
                "mehl+",
                "--zoo",
                mismatched.to_str().unwrap(),
                "--out",
                &p("o3"),
            ]),
            "b.safetensors",
        ),
        (
            vec![
                "mix".into(),
                "--method".into(),
                "uniform".into(),
                "--zoo".into(),
                zoo.path("zoo"),
                "--data".into(),
                empty_data.display().to_string(),
                "--out".into(),
                p("o4"),
            ],
            "unknown data set layout",
        ),
        (
            with(&[
                "mix",
                "--method",
                "stew",
                "--zoo",
                &zoo.path("zoo"),
                "--out",
                &p("o5"),
            ]),
            "invalid value 'stew'",
        ),
        (
            with(&[
                "mix",
                "--method",
                "mehl+",
                "--zoo",
                &zoo.path("zoo"),
                "--out",
                &p("o6"),
                "--block-cut",
                "diagonal",
            ]),
            "--block-cut",
        ),
        (
            with(&[
                "mix",
                "--method",
                "mehl+",
                "--zoo",
                &zoo.path("zoo"),
                "--out",
                &p("o7"),
                "--lr",
                "1e30",
                "--optimizer",
                "sgd",
                "--clip-grad-norm",
                "0",
            ]),
            "non-finite",
        ),
        (
            with(&[
                "mix",
                "--method",
                "learned+",
                "--zoo",
                &zoo.path("zoo"),
                "--out",
                &p("o8"),
                "--max-memory",
                "1K",
            ]),
            "over --max-memory",
        ),
        (
            with(&[
                "mix",
                "--method",
                "mehl+",
                "--zoo",
                &zoo.path("zoo"),
                "--out",
                &p("o9"),
                "--model-batch",
                "0",
            ]),
            "model_batch",
        ),
        (
            with(&["eval", "--model", &p("absent.safetensors")]),
            "absent.safetensors",
        ),
        (
            with(&[
                "mix",
                "--method",
                "mehl",
                "--zoo",
                &zoo.path("zoo"),
                "--out",
                &p("o10"),
                "--resume",
            ]),
            "no saved progress",
        ),
    ];
    for (args, what) in &cases {
        fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), what);
    }
    for o in ["o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8", "o9", "o10"] {
        assert!(
            !dir.path().join(o).exists(),
            "{o} was written by a failing run"
        );
    }
}

fn soup_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    common::run(None, args, env)
}

#[test]
fn a_zoo_of_hub_models_mixes_like_the_local_zoo_and_works_offline_afterwards() {
    use soup_models::testkit::hub::{Behaviour, HubServer};
    let zoo = zoo();
    let hf_home = ScratchDir::new("cli-hf-home");
    let home = hf_home.path().display().to_string();
    let server = HubServer::start(Behaviour::Normal).unwrap();
    let commit = "abcdef0123456789abcdef0123456789abcdef01";
    let models = ["model-00", "model-01", "model-02"];
    let mut local = String::new();
    let mut remote = String::new();
    for (i, m) in models.iter().enumerate() {
        let dir = zoo.root.join("zoo").join(m);
        server
            .add_dir(&format!("org/m{i}"), "main", commit, &dir)
            .unwrap();
        local += &format!("[[model]]\npath = \"{}\"\n", dir.display());
        remote += &format!("[[model]]\npath = \"hf://org/m{i}\"\n");
    }
    std::fs::write(zoo.root.join("hub-local.toml"), local).unwrap();
    std::fs::write(zoo.root.join("hub-remote.toml"), remote).unwrap();
    let env = [
        ("HF_ENDPOINT", server.url.as_str()),
        ("HF_HOME", home.as_str()),
    ];
    for (manifest, out) in [
        ("hub-local.toml", "hub-local"),
        ("hub-remote.toml", "hub-remote"),
    ] {
        let mut args = mix(zoo, "mehl+", out, "2");
        args[4] = zoo.path(manifest);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = soup_env(&args, &env);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let soup = |out: &str| soup_bits(&format!("{}/model.safetensors", zoo.path(out)));
    assert_eq!(soup("hub-local"), soup("hub-remote"));
    let report = json(format!("{}/report.json", zoo.path("hub-remote")));
    assert_eq!(report["zoo"][1]["source"], "hf://org/m1");
    assert_eq!(report["zoo"][1]["commit"], commit);
    let coefficients = json(format!("{}/coefficients.json", zoo.path("hub-remote")));
    assert_eq!(coefficients["models"][0], "hf://org/m0");

    // The server gone and HF_HUB_OFFLINE set: inspect and eval run from the cache; a model
    // never fetched is a one-line error naming it.
    server.stop();
    let offline = [
        ("HF_ENDPOINT", server.url.as_str()),
        ("HF_HOME", home.as_str()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let o = soup_env(&["inspect", "hf://org/m2"], &offline);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("clip-vit"), "{text}");
    let o = soup_env(
        &[
            "eval",
            "--model",
            "hf://org/m0",
            "--data",
            DATA,
            "--max-examples",
            LIMIT,
            "--json",
        ],
        &offline,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = soup_env(&["inspect", "hf://org/m9"], &offline);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("soup: hf://org/m9: ") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_hub_that_never_answers_ends_in_a_timeout_error() {
    use soup_models::testkit::hub::{Behaviour, HubServer};
    let hf_home = ScratchDir::new("cli-hang");
    let home = hf_home.path().display().to_string();
    let server = HubServer::start(Behaviour::Hang).unwrap();
    let env = [
        ("HF_ENDPOINT", server.url.as_str()),
        ("HF_HOME", home.as_str()),
        ("HF_HUB_ETAG_TIMEOUT", "0.5"),
        ("SOUP_HUB_RETRIES", "0"),
    ];
    let t = std::time::Instant::now();
    let o = soup_env(&["inspect", "hf://org/m0"], &env);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("timed out"), "{err}");
    // One attempt of 0.5 s: anything near this bound means a hang.
    assert!(
        t.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t.elapsed()
    );
}

/// Without a terminal (a log file, CI) long phases report in plain lines with rate and ETA:
/// each method's work, the phases around it, and a last line at 100 %.
#[test]
fn progress_is_plain_lines_when_stderr_is_not_a_terminal() {
    let zoo = zoo();
    for (method, expected) in [
        ("uniform", "models loaded: 6/6 (100 %)"),
        ("greedy", "greedy: models ranked and tried: 12/12 (100 %)"),
        ("mehl+", "mehl+ steps: 12/12 (100 %)"),
        ("learned+", "learned+ steps: 6/6 (100 %)"),
    ] {
        let out_dir = format!("progress-{method}");
        let args = mix(zoo, method, &out_dir, "3");
        let out = Command::new(env!("CARGO_BIN_EXE_soup"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains(expected), "{method}: {err}");
        assert!(err.contains("/s, eta 0s, elapsed "), "{method}: {err}");
        assert!(
            err.contains("soup: 6 models of 20042 parameters; loading"),
            "{err}"
        );
        assert!(err.contains("soup: evaluating the soup"), "{err}");
        assert!(
            !err.contains('\r') && !err.contains('\u{1b}'),
            "no terminal codes: {err:?}"
        );
    }
}

/// `--dry-run` measures and estimates, refuses nothing silently, and writes nothing.
#[test]
fn a_dry_run_estimates_memory_and_time_and_writes_nothing() {
    let zoo = zoo();
    let mut args = mix(zoo, "mehl+", "dry", "3");
    args.extend(["--dry-run", "--max-memory", "1K"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok(&args);
    assert!(
        out.contains("dry run of mehl+: 6 models of 20042 parameters"),
        "{out}"
    );
    assert!(out.contains("refused  mehl+ needs about"), "{out}");
    assert!(
        out.contains("12 steps") && out.contains("2 held-out evaluations"),
        "{out}"
    );
    assert!(out.contains("nothing was written"), "{out}");
    assert!(!Path::new(&zoo.path("dry")).exists());
    assert!(!Path::new(&zoo.path("dry.partial")).exists());
}

/// `soup merge` on a CLIP zoo (which mergekit cannot read): linear with equal weights is the
/// uniform soup, and a TIES merge onto the start point is a model `soup eval` reads.
#[test]
fn soup_merge_merges_a_clip_zoo_and_equal_linear_weights_are_the_uniform_soup() {
    let zoo = zoo();
    let mut members: Vec<PathBuf> = std::fs::read_dir(zoo.root.join("zoo"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("model.safetensors").is_file())
        .collect();
    members.sort();
    assert_eq!(members.len(), 6);
    let config = |name: &str, method: &str, each: &str, base: bool| -> String {
        let mut text = String::from("models:\n");
        for m in &members {
            text.push_str(&format!(
                "  - model: {}\n    parameters: {each}\n",
                m.display()
            ));
        }
        text.push_str(&format!("merge_method: {method}\n"));
        if base {
            text.push_str(&format!("base_model: {}\n", zoo.path("base.safetensors")));
        }
        let path = zoo.root.join(format!("{name}.yml"));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let linear = config("linear", "linear", "{weight: 1.0}", false);
    ok(&["merge", &linear, "--out", &zoo.path("merge-linear")]);
    let args = mix(zoo, "uniform", "merge-uniform", "2");
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let load = |dir: &str| {
        let ckpt = Checkpoint::open(zoo.path(dir)).unwrap();
        let arch = ckpt.architecture().unwrap();
        ckpt.load_params(arch.as_ref(), &Device::Cpu).unwrap()
    };
    for (a, b) in load("merge-linear").iter().zip(&load("merge-uniform")) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let scale = b.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * scale, "{x} against {y}");
        }
    }
    let ties = config("ties", "ties", "{weight: 1.0, density: 0.2}", true);
    ok(&["merge", &ties, "--out", &zoo.path("merge-ties")]);
    let said = ok(&[
        "eval",
        "--model",
        &zoo.path("merge-ties"),
        "--data",
        DATA,
        "--max-examples",
        LIMIT,
    ]);
    assert!(said.contains("accuracy"), "{said}");
    let ties = load("merge-ties");
    let base = load("base.safetensors");
    assert!(ties.iter().zip(&base).any(|(t, b)| {
        t.sub(b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    }));
}

/// A mergekit configuration naming Hub repositories (`org/name`, as mergekit writes them, or
/// `hf://org/name`) merges the same bytes as one naming the local directories.
#[test]
fn soup_merge_reads_hub_repositories_named_as_mergekit_names_them() {
    use soup_models::testkit::hub::{Behaviour, HubServer};
    let zoo = zoo();
    let hf_home = ScratchDir::new("merge-hf-home");
    let home = hf_home.path().display().to_string();
    let server = HubServer::start(Behaviour::Normal).unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let dirs: Vec<PathBuf> = ["model-00", "model-01"]
        .iter()
        .map(|m| zoo.root.join("zoo").join(m))
        .collect();
    for (i, dir) in dirs.iter().enumerate() {
        server
            .add_dir(&format!("org/m{i}"), "main", commit, dir)
            .unwrap();
    }
    let text = |a: &str, b: &str| {
        format!(
            "models:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n    parameters: {{weight: 0.3}}\nmerge_method: linear\n"
        )
    };
    let local = zoo.root.join("merge-local.yml");
    let remote = zoo.root.join("merge-remote.yml");
    std::fs::write(
        &local,
        text(
            &dirs[0].display().to_string(),
            &dirs[1].display().to_string(),
        ),
    )
    .unwrap();
    std::fs::write(&remote, text("org/m0", "hf://org/m1")).unwrap();
    let env = [
        ("HF_ENDPOINT", server.url.as_str()),
        ("HF_HOME", home.as_str()),
    ];
    for (config, out) in [(&local, "merge-hub-local"), (&remote, "merge-hub-remote")] {
        let o = soup_env(
            &[
                "merge",
                &config.display().to_string(),
                "--out",
                &zoo.path(out),
            ],
            &env,
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let bytes = |out: &str| std::fs::read(format!("{}/model.safetensors", zoo.path(out))).unwrap();
    assert_eq!(bytes("merge-hub-local"), bytes("merge-hub-remote"));
    server.stop();
}
