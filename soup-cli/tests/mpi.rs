//! `soup mix` over several processes with OpenMPI's `mpirun` (cargo feature `mpi`; `cargo xtask
//! ci` installs OpenMPI and runs these): the same soup and α as one process, each rank loading
//! only its share of every model batch, and a failing rank ending the whole run.

use std::path::Path;
use std::process::{Command, Output};

use candle_core::Device;
use soup_models::arch::clip::ClipClassifier;
use soup_models::checkpoint::write_model_dir;
use soup_models::testkit::fixtures::{random_zoo, tiny_clip_config, ScratchDir};
use soup_models::{Architecture, Checkpoint};

const DATA: &str = "/usr/share/datasets/fashion-mnist";
const N: usize = 5;
const B: usize = 4;

/// A zoo of N random tiny CLIP classifiers (accuracy is irrelevant: equality is tested).
fn zoo(dir: &Path) -> usize {
    assert!(
        Path::new(DATA).join("train-images-idx3-ubyte.gz").exists(),
        "Fashion-MNIST is missing from {DATA}: `cargo xtask ci` installs it"
    );
    let arch = ClipClassifier::new(tiny_clip_config(1, 10)).unwrap();
    for (i, params) in random_zoo(&arch, N, 3).unwrap().iter().enumerate() {
        write_model_dir(
            &dir.join(format!("zoo/model-{i}")),
            &arch,
            params,
            &Default::default(),
            "",
        )
        .unwrap();
    }
    arch.layout().numel()
}

fn mix_args(dir: &Path, method: &str, out: &str) -> Vec<String> {
    [
        "mix",
        "--method",
        method,
        "--zoo",
        &dir.join("zoo").display().to_string(),
        "--data",
        DATA,
        "--max-examples",
        "96",
        "--model-batch",
        &B.to_string(),
        "--inner-epochs",
        "2",
        "--batch-size",
        "32",
        "--out",
        &dir.join(out).display().to_string(),
        "-q",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(ranks: usize, args: &[String]) -> Output {
    let exe = env!("CARGO_BIN_EXE_soup");
    let out = if ranks == 1 {
        Command::new(exe).args(args).output()
    } else {
        Command::new("mpirun")
            .args(["--allow-run-as-root", "--oversubscribe", "-np"])
            .arg(ranks.to_string())
            .args(["--mca", "btl_vader_single_copy_mechanism", "none"])
            .arg(exe)
            .args(args)
            .output()
    };
    out.expect("run soup (mpirun from Debian's openmpi-bin, which `cargo xtask ci` installs)")
}

fn ok(ranks: usize, args: &[String]) {
    let o = run(ranks, args);
    assert!(
        o.status.success(),
        "{ranks} ranks: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

mod common;
use common::json;

/// The soup's tensors by name, as f64.
fn soup(dir: &Path) -> Vec<(String, Vec<f64>)> {
    let ckpt = Checkpoint::open(dir.join("model.safetensors")).unwrap();
    let arch = ckpt.architecture().unwrap();
    let params = ckpt.load_params(arch.as_ref(), &Device::Cpu).unwrap();
    arch.layout()
        .tensors
        .iter()
        .zip(params)
        .map(|(spec, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (spec.name.clone(), v.into_iter().map(f64::from).collect())
        })
        .collect()
}

fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// α per block: (block name, α over the models).
fn alphas(dir: &Path) -> Vec<(String, Vec<f64>)> {
    let c = json(dir.join("coefficients.json"));
    let blocks = c["blocks"].as_array().unwrap();
    blocks
        .iter()
        .zip(c["alpha"].as_array().unwrap())
        .map(|(name, row)| {
            let row = row.as_array().unwrap().iter().map(|a| a.as_f64().unwrap());
            (name.as_str().unwrap().to_string(), row.collect())
        })
        .collect()
}

/// The largest relative difference of α and of the soup between two runs, per block or tensor,
/// over the names `keep` accepts.
fn max_diff(a: &Path, b: &Path, keep: impl Fn(&str) -> bool) -> (f64, f64) {
    let worst = |x: Vec<(String, Vec<f64>)>, y: Vec<(String, Vec<f64>)>| {
        assert_eq!(x.len(), y.len());
        x.iter()
            .zip(&y)
            .filter(|((name, _), _)| keep(name))
            .map(|((_, u), (_, v))| rel_diff(u, v))
            .fold(0.0, f64::max)
    };
    (worst(alphas(a), alphas(b)), worst(soup(a), soup(b)))
}

/// The key projection's bias has an identically zero gradient (softmax cancels it), so AdamW's
/// normalised steps move its coefficients by rounding noise, differently in every summation
/// order: those blocks are compared only under SGD.
fn gradient_is_not_identically_zero(name: &str) -> bool {
    !name.ends_with("k_proj.bias")
}

#[test]
fn mehl_plus_over_two_and_three_ranks_equals_one_process() {
    let dir = ScratchDir::new("mpi");
    let d = zoo(dir.path());
    let sgd = ["--optimizer", "sgd", "--lr", "0.5", "--momentum", "0.9"].map(String::from);
    ok(1, &mix_args(dir.path(), "mehl+", "one"));
    ok(
        1,
        &[mix_args(dir.path(), "mehl+", "one-sgd"), sgd.to_vec()].concat(),
    );
    let one = dir.path().join("one");
    for ranks in [2usize, 3] {
        let name = format!("ranks-{ranks}");
        ok(ranks, &mix_args(dir.path(), "mehl+", &name));
        let out = dir.path().join(&name);
        let (alpha, soup) = max_diff(&out, &one, gradient_is_not_identically_zero);
        assert!(
            alpha <= 1e-5 && soup <= 1e-5,
            "{ranks} ranks, AdamW: α {alpha:e}, soup {soup:e}"
        );
        let sgd_name = format!("ranks-{ranks}-sgd");
        ok(
            ranks,
            &[mix_args(dir.path(), "mehl+", &sgd_name), sgd.to_vec()].concat(),
        );
        let (alpha, soup) = max_diff(
            &dir.path().join(&sgd_name),
            &dir.path().join("one-sgd"),
            |_| true,
        );
        assert!(
            alpha <= 1e-5 && soup <= 1e-5,
            "{ranks} ranks, SGD: α {alpha:e}, soup {soup:e}"
        );

        // Each rank held at most ⌈b/W⌉ models of a batch and their directions, and loaded only
        // its share: the first center's share plus every batch's share.
        let report = json(out.join("report.json"));
        assert_eq!(report["world_size"], ranks);
        let k = B.div_ceil(ranks);
        let batches: Vec<usize> = (0..N).step_by(B).map(|s| (N - s).min(B)).collect();
        let mut total = 0.0;
        for (r, rank) in report["ranks"].as_array().unwrap().iter().enumerate() {
            let held = rank["max_models_per_batch"].as_f64().unwrap() as usize;
            assert!(held <= k, "rank {r} held {held} models, more than {k}");
            assert_eq!(
                rank["direction_bytes"].as_f64().unwrap() as usize,
                held * d * 4
            );
            let share = |len: usize| {
                let k = len.div_ceil(ranks);
                len.min((r + 1) * k).saturating_sub(r * k)
            };
            let expected: usize =
                share(batches[0]) + batches.iter().map(|&len| share(len)).sum::<usize>();
            assert_eq!(
                rank["models_loaded"].as_f64().unwrap() as usize,
                expected,
                "rank {r}"
            );
            assert!(rank["peak_rss_bytes"].as_f64().unwrap() > 0.0);
            total += rank["models_loaded"].as_f64().unwrap();
        }
        assert_eq!(total as usize, batches[0] + N);
        assert_eq!(
            report["ranks"][0]["max_models_per_batch"].as_f64().unwrap() as usize,
            k
        );
    }
}

#[test]
fn uniform_over_two_ranks_equals_one_process_and_other_methods_are_refused() {
    let dir = ScratchDir::new("mpi-uniform");
    zoo(dir.path());
    ok(1, &mix_args(dir.path(), "uniform", "one"));
    ok(2, &mix_args(dir.path(), "uniform", "two"));
    let (_, soup) = max_diff(&dir.path().join("two"), &dir.path().join("one"), |_| true);
    assert!(soup <= 1e-6, "{soup:e}");
    let o = run(2, &mix_args(dir.path(), "greedy", "greedy"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("greedy runs in one process"), "{err}");
}

#[test]
fn a_failing_rank_stops_the_run_with_its_message() {
    let dir = ScratchDir::new("mpi-fail");
    zoo(dir.path());
    // Corrupt every model but the first: whichever rank loads one fails while the others wait.
    for i in 1..N {
        let f = dir.path().join(format!("zoo/model-{i}/model.safetensors"));
        std::fs::write(&f, b"not a checkpoint").unwrap();
    }
    let started = std::time::Instant::now();
    let o = run(2, &mix_args(dir.path(), "mehl+", "out"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("soup: rank ") && err.contains("model.safetensors"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists());
    // A hang would run into the test harness's limits; this bound only says it did not.
    assert!(started.elapsed() < std::time::Duration::from_secs(120));
}
