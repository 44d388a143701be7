//! `cargo xtask bench`: side-by-side benchmarks (release builds), as markdown tables on stdout and
//! JSON in `target/bench/bench.json`. Contenders run alternately in one invocation.
//!
//! - `step`: forward + backward + update of the ViT-B/32 classifier per data batch size: ours
//!   (`soup-models/examples/step_bench.rs`) and, with `--torch`, PyTorch (`bench/clip_torch.py`,
//!   the same architecture and shapes), `--repeats` processes each, `--rounds` timed rounds per
//!   process; medians over all rounds and the ratio ours / PyTorch.
//! - `mehl`: one MEHL-Soup+ coefficient step (b = 8) against one plain training step of the same
//!   model (`mehl_bench.rs`), with the memory-bound parts alone, for f32 and bf16 directions.
//! - `authors` (needs `--torch`): `soup mix --method mehl+` against a PyTorch port of the
//!   authors' loop (`bench/mehl_authors.py`) on one tiny CLIP zoo and the same Fashion-MNIST
//!   examples and knobs: wall time and peak RSS of each process (GNU time).
//! - `load`: checkpoint loading throughput against the copy bandwidth (`load_bench.rs`).
//! - `gemm`: the matrix products of a ViT-B/32 and a DINOv2-S step on their exact shapes
//!   (`gemm_bench.rs`): the `gemm` crate against BLIS and OpenBLAS (Debian's, loaded at run time;
//!   `OPENBLAS_CORETYPE` as the machine sets it).
//! - `blas`: the ViT-B/32 training step with the `gemm` crate (the default) against the same
//!   step with soup-models' feature `openblas` (installs Debian's libopenblas-dev), two release
//!   binaries of the same source in alternating processes.
//! - `alloc`: the training step and checkpoint loading under each allocator: soup's settings of
//!   glibc's malloc (`soup_models::alloc`), glibc's defaults (plain, and with its
//!   transparent-huge-page tunable), mimalloc and jemalloc (Debian's, through `LD_PRELOAD`, with
//!   their huge-page settings), in alternating processes of the same binaries
//!   (`examples/common/bench_alloc.rs`).
//!
//! - `lm`: a SmolLM2-135M-shaped training step (`lm_step_bench.rs`) and, with `--torch`,
//!   transformers' LlamaForCausalLM of the same shape (`bench/lm_torch.py`), at 4 × 256 and
//!   1 × 1,024 tokens.
//!
//! - `corpus`: peak RSS of training and evaluating a tiny language model on a 2 GB corpus, its
//!   windows spilled to a file of tokens (`corpus.rs`).
//!
//! `--torch` makes a Python virtual environment in `target/bench/torch-venv` with
//! `pip install torch safetensors numpy transformers` when it has none (a few GB; never in CI).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::reproduce::{strings, Soup};
use crate::{ensure_packages, release_example, root, DATA_PACKAGES};

struct Options {
    batches: Vec<usize>,
    rounds: usize,
    repeats: usize,
    torch: bool,
    only: Vec<String>,
}

const SECTIONS: &[&str] = &[
    "step", "mehl", "authors", "load", "alloc", "gemm", "blas", "lm", "corpus",
];

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        batches: vec![8, 32],
        rounds: 3,
        repeats: 3,
        torch: false,
        only: SECTIONS.iter().map(|s| s.to_string()).collect(),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--torch" {
            o.torch = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{flag}: {v:?} is not a positive integer"))
        };
        match flag.as_str() {
            "--batch" => o.batches = value.split(',').map(number).collect::<Result<_, _>>()?,
            "--rounds" => o.rounds = number(value)?,
            "--repeats" => o.repeats = number(value)?,
            "--only" => {
                o.only = value.split(',').map(str::to_string).collect();
                if let Some(bad) = o.only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                    return Err(format!(
                        "--only: unknown section {bad:?} (sections: {})",
                        SECTIONS.join(", ")
                    ));
                }
            }
            other => return Err(format!("unknown bench flag {other}")),
        }
    }
    if o.only.iter().any(|s| s == "authors") && !o.torch {
        o.only.retain(|s| s != "authors");
        eprintln!("xtask: the `authors` section needs --torch; skipped");
    }
    Ok(o)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Runs a command; returns its stdout as JSON lines (non-JSON lines are skipped).
fn json_lines(cmd: &mut Command) -> Result<Vec<Value>, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Every round's seconds of the lines with `key` = `value`.
fn seconds(lines: &[Value], key: &str, value: &str) -> Vec<f64> {
    lines
        .iter()
        .filter(|l| l[key] == value)
        .flat_map(|l| l["seconds"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| s.as_f64())
        .collect()
}

/// The Python of the benchmark venv, made when missing.
fn torch_python() -> Result<PathBuf, String> {
    let venv = root().join("target/bench/torch-venv");
    let python = venv.join("bin/python");
    let ready = |p: &Path| {
        Command::new(p)
            .args(["-c", "import torch, safetensors, numpy, transformers"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if python.exists() && ready(&python) {
        return Ok(python);
    }
    eprintln!(
        "xtask: making {} (pip install torch: a few GB)",
        venv.display()
    );
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err("`python3 -m venv` failed: install python3 and python3-venv".into());
    }
    let ok = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "-q",
            "torch",
            "safetensors",
            "numpy",
            "transformers",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok || !ready(&python) {
        return Err(
            "pip install torch safetensors numpy transformers failed in the bench venv".into(),
        );
    }
    Ok(python)
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn bench(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let out_dir = root().join("target/bench");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let python = if o.torch { Some(torch_python()?) } else { None };
    let mut report = serde_json::Map::new();
    report.insert(
        "machine".into(),
        json!({ "cpu": cpu_name(), "threads": threads() }),
    );
    let mut md = String::new();
    for section in &o.only {
        let (value, table) = match section.as_str() {
            "step" => step(&o, python.as_deref())?,
            "lm" => lm(&o, python.as_deref())?,
            "mehl" => mehl(&o)?,
            "authors" => authors(&o, python.as_deref().expect("--torch"))?,
            "load" => load(&o)?,
            "alloc" => alloc(&o)?,
            "gemm" => gemm(&o)?,
            "blas" => blas_step(&o)?,
            "corpus" => crate::corpus::corpus_memory()?,
            _ => unreachable!("sections are checked"),
        };
        println!("{table}");
        md.push_str(&table);
        md.push('\n');
        report.insert(section.clone(), value);
    }
    let path = out_dir.join("bench.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&report).expect("JSON") + "\n",
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::write(out_dir.join("bench.md"), md).map_err(|e| e.to_string())?;
    println!("(raw results in target/bench/bench.json)");
    Ok(())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Forward + backward step, ours against PyTorch.
/// The models of the step section: ViT-B/32 (1000 classes) and DINOv2-S/14 at 224 px.
const STEP_ARCHS: &[&str] = &["clip-vit-b32", "dinov2-vit-s14"];

fn step(o: &Options, python: Option<&Path>) -> Result<(Value, String), String> {
    let exe = release_example("step_bench")?;
    let script = root().join("bench/clip_torch.py");
    let mut rows = Vec::new();
    let mut kernels = Vec::new();
    let mut table = String::from(
        "### Forward + backward step, ViT-B/32 and DINOv2-S/14 classifiers (1000 classes), CPU\n\n\
         | model | batch | phase | ours (s) | PyTorch (s) | ours / PyTorch | ours peak RSS (GB) | PyTorch peak RSS (GB) |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for &arch in STEP_ARCHS {
        for &batch in &o.batches {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for rep in 0..o.repeats {
                eprintln!("xtask: step, {arch}, batch {batch}, repeat {}", rep + 1);
                let b = batch.to_string();
                let r = o.rounds.to_string();
                ours.extend(json_lines(
                    Command::new(&exe).args(["--arch", arch, "--batch", &b, "--rounds", &r]),
                )?);
                if let Some(py) = python {
                    theirs.extend(json_lines(Command::new(py).arg(&script).args([
                        "--arch",
                        arch,
                        "--batch",
                        &b,
                        "--rounds",
                        &r,
                        "--threads",
                        &threads().to_string(),
                    ]))?);
                }
            }
            for l in &ours {
                if let Some(k) = l["gemm_kernels"].as_str() {
                    if !kernels.contains(&k.to_string()) {
                        kernels.push(k.to_string());
                    }
                }
            }
            let mut row = phase_rows(&format!("{arch} | {batch}"), &ours, &theirs, &mut table);
            row["arch"] = json!(arch);
            row["batch"] = json!(batch);
            rows.push(row);
        }
    }
    table.push_str(&format!(
        "\n{} processes per contender, model and batch, alternating, {} timed rounds each after a warm-up round; medians over all rounds. Ours ran the gemm crate's {} kernels (`SOUP_GEMM_KERNELS`).\n",
        o.repeats, o.rounds, kernels.join(", ")
    ));
    Ok((json!(rows), table))
}

/// The forward, backward and step rows of a side-by-side table (`label` in its first columns)
/// from each contender's JSON lines, and their JSON: every round, medians, ratio, peak RSS.
fn phase_rows(label: &str, ours: &[Value], theirs: &[Value], table: &mut String) -> Value {
    let rss = |lines: &[Value]| {
        median(
            &lines
                .iter()
                .filter_map(|l| l["peak_rss_bytes"].as_f64())
                .collect::<Vec<_>>(),
        ) / 1e9
    };
    let mut phases = serde_json::Map::new();
    for phase in ["forward", "backward", "step"] {
        let a = seconds(ours, "phase", phase);
        let b = seconds(theirs, "phase", phase);
        let (ma, mb) = (median(&a), median(&b));
        table.push_str(&format!(
            "| {label} | {phase} | {ma:.3} | {} | {} | {:.2} | {} |\n",
            fmt(mb, 3),
            fmt(ma / mb, 2),
            rss(ours),
            fmt(rss(theirs), 2)
        ));
        phases.insert(
            phase.into(),
            json!({ "ours_s": a, "pytorch_s": b, "ours_median_s": ma,
                    "pytorch_median_s": mb, "ratio": ma / mb }),
        );
    }
    json!({ "phases": phases, "ours_peak_rss_bytes": rss(ours) * 1e9,
            "pytorch_peak_rss_bytes": rss(theirs) * 1e9 })
}

/// `lm`: a SmolLM2-135M-shaped training step (`lm_step_bench`) against transformers'
/// LlamaForCausalLM of the same shape (`bench/lm_torch.py`), at 4 × 256 and 1 × 1,024 tokens.
fn lm(o: &Options, python: Option<&Path>) -> Result<(Value, String), String> {
    let exe = release_example("lm_step_bench")?;
    let script = root().join("bench/lm_torch.py");
    let mut rows = Vec::new();
    let mut table = String::from(
        "### Forward + backward step, SmolLM2-135M shape (llama, random weights), CPU\n\n\
         | batch | tokens | phase | ours (s) | PyTorch (s) | ours / PyTorch | ours peak RSS (GB) | PyTorch peak RSS (GB) |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (batch, seq) in [(4usize, 256usize), (1, 1024)] {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let (b, s, r) = (batch.to_string(), seq.to_string(), o.rounds.to_string());
        let flags = ["--batch", &b, "--seq", &s, "--rounds", &r];
        for rep in 0..o.repeats {
            eprintln!("xtask: lm, {batch} × {seq}, repeat {}", rep + 1);
            ours.extend(json_lines(Command::new(&exe).args(flags))?);
            if let Some(py) = python {
                theirs.extend(json_lines(
                    Command::new(py)
                        .arg(&script)
                        .args(flags)
                        .args(["--threads", &threads().to_string()]),
                )?);
            }
        }
        let mut row = phase_rows(&format!("{batch} | {seq}"), &ours, &theirs, &mut table);
        row["batch"] = json!(batch);
        row["seq"] = json!(seq);
        rows.push(row);
    }
    table.push_str(&format!(
        "\n{} processes per contender and shape, alternating, {} timed rounds each after a warm-up round; medians over all rounds. Ours: the hand-written pass of `llama` (`arch/llama/tape.rs`): \"forward\" is the decoder layers, \"backward\" the vocabulary head fused with the loss, then every gradient; PyTorch's forward includes its head and loss.\n",
        o.repeats, o.rounds
    ));
    Ok((json!(rows), table))
}

fn fmt(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "–".into()
    }
}

/// MEHL-Soup+ step against a plain training step.
fn mehl(o: &Options) -> Result<(Value, String), String> {
    let exe = release_example("mehl_bench")?;
    let mut rows = Vec::new();
    let mut table = String::from(
        "### MEHL-Soup+ coefficient step (b = 8) against a plain training step, CLIP ViT-B/32 (10 classes), CPU\n\n\
         | batch | directions | plain step (s) | MEHL+ step (s) | MEHL+ / plain | the same within a process | of which norm + projection (s) | θ = c + Σ X d (s) | first step of a model batch (s) | peak RSS (GB) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for &batch in &o.batches {
        // f32 and bf16 directions in alternating processes.
        // Per dtype: every process's lines, and each process's own MEHL+ / plain (its medians).
        let mut runs: [(&str, Vec<Value>, Vec<f64>); 2] = [
            ("f32", Vec::new(), Vec::new()),
            ("bf16", Vec::new(), Vec::new()),
        ];
        for _ in 0..o.repeats {
            for (dtype, lines, ratios) in runs.iter_mut() {
                eprintln!("xtask: mehl, batch {batch}, {dtype} directions");
                let process = json_lines(Command::new(&exe).args([
                    "--b",
                    "8",
                    "--batch",
                    &batch.to_string(),
                    "--steps",
                    "4",
                    "--rounds",
                    "1",
                    "--direction-dtype",
                    dtype,
                ]))?;
                let m = |kind: &str| median(&seconds(&process, "kind", kind));
                ratios.push(m("mehl+") / m("plain"));
                lines.extend(process);
            }
        }
        for (dtype, lines, ratios) in &runs {
            let m = |kind: &str| median(&seconds(lines, "kind", kind));
            let (plain, step) = (m("plain"), m("mehl+"));
            let rss = median(
                &lines
                    .iter()
                    .filter_map(|l| l["peak_rss_bytes"].as_f64())
                    .collect::<Vec<_>>(),
            ) / 1e9;
            table.push_str(&format!(
                "| {batch} | {dtype} | {plain:.3} | {step:.3} | {:.2} | {:.2} | {:.3} | {:.3} | {:.3} | {rss:.2} |\n",
                step / plain,
                median(ratios),
                m("mehl+ norm and projection"),
                m("mehl+ materialise"),
                m("mehl+ first step")
            ));
            rows.push(json!({
                "batch": batch,
                "directions": dtype,
                "lines": lines,
                "ratio": step / plain,
                "process_ratios": ratios,
            }));
        }
    }
    table.push_str(&format!(
        "\n{} processes per direction dtype, alternating, each one round of 4 plain steps then 4 MEHL+ steps (after a warm-up round); medians over all steps, the first MEHL+ step of each model batch apart; \"within a process\": the median over processes of each one's MEHL+ median over its plain median (processes differ by up to 15 % on a shared machine). The zoo's 8 models are made when MEHL loads them (as files are read); the peak RSS is the process's, plain steps included.\n",
        o.repeats
    ));
    Ok((json!(rows), table))
}

/// The tiny CLIP of the end-to-end comparison: 1-channel 28 px Fashion-MNIST, 3 layers.
const TINY_CLIP: &str = r#"{"hidden_size":96,"intermediate_size":384,"num_hidden_layers":3,"num_attention_heads":4,"num_channels":1,"image_size":28,"patch_size":7,"projection_dim":64}"#;
const AUTHORS_MODELS: usize = 8;
const AUTHORS_EXAMPLES: usize = 2000;

/// Wall seconds and peak RSS (bytes) of a command, by GNU time.
pub(crate) fn timed(cmd: &[String], log: &Path) -> Result<(f64, f64, String), String> {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%e %M", "-o"])
        .arg(log)
        .args(cmd)
        .output()
        .map_err(|e| format!("cannot run /usr/bin/time: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = std::fs::read_to_string(log).map_err(|e| e.to_string())?;
    let mut f = text.split_whitespace();
    let wall: f64 = f
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or("bad time output")?;
    let kb: f64 = f
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or("bad time output")?;
    Ok((
        wall,
        kb * 1024.0,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// `soup mix --method mehl+` against the authors' loop ported to PyTorch.
fn authors(o: &Options, python: &Path) -> Result<(Value, String), String> {
    ensure_packages(DATA_PACKAGES)?;
    ensure_packages(&[("time", "/usr/bin/time")])?;
    let soup = Soup::build(false, &[])?;
    let dir = root().join("target/bench/authors");
    let zoo = dir.join("zoo");
    let maker = release_example("perturbed_zoo")?;
    let ok = Command::new(&maker)
        .args(["--arch", "clip-vit", "--classes", "10", "--sigma", "0.02"])
        .args([
            "--count",
            &AUTHORS_MODELS.to_string(),
            "--config",
            TINY_CLIP,
        ])
        .arg("--out")
        .arg(&zoo)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err("perturbed_zoo failed to write the tiny zoo".into());
    }
    let index = dir.join("heldout.txt");
    let rows: Vec<String> = (0..AUTHORS_EXAMPLES).map(|i| i.to_string()).collect();
    std::fs::write(&index, rows.join("\n") + "\n").map_err(|e| e.to_string())?;
    let (b, epochs, batch, lr, seed) = ("4", "2", "50", "0.01", "1");
    let mut ours_cmd = vec![soup.exe().display().to_string()];
    ours_cmd.extend(strings(&["mix", "-q", "--method", "mehl+", "--zoo"]));
    ours_cmd.push(zoo.display().to_string());
    ours_cmd.extend(strings(&["--data", "fashion-mnist", "--heldout-index"]));
    ours_cmd.push(index.display().to_string());
    ours_cmd.extend(strings(&[
        "--max-examples",
        &AUTHORS_EXAMPLES.to_string(),
        "--model-batch",
        b,
        "--inner-epochs",
        epochs,
        "--batch-size",
        batch,
        "--lr",
        lr,
        "--seed",
        seed,
        "--force",
        "--out",
    ]));
    ours_cmd.push(dir.join("soup-out").display().to_string());
    let mut theirs_cmd = vec![
        python.display().to_string(),
        root().join("bench/mehl_authors.py").display().to_string(),
        "--zoo".into(),
        zoo.display().to_string(),
        "--heldout-index".into(),
        index.display().to_string(),
    ];
    theirs_cmd.extend(strings(&[
        "--examples",
        &AUTHORS_EXAMPLES.to_string(),
        "--model-batch",
        b,
        "--epochs",
        epochs,
        "--batch-size",
        batch,
        "--lr",
        lr,
        "--seed",
        seed,
        "--threads",
        &threads().to_string(),
    ]));
    let log = dir.join("time.log");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut accuracy = (f64::NAN, f64::NAN);
    for rep in 0..o.repeats {
        eprintln!("xtask: authors, repeat {}", rep + 1);
        let (w, r, _) = timed(&ours_cmd, &log)?;
        ours.push((w, r));
        let report = crate::reproduce::read_json(&dir.join("soup-out/report.json"))?;
        accuracy.0 = report["test"]["accuracy"].as_f64().unwrap_or(f64::NAN);
        let (w, r, stdout) = timed(&theirs_cmd, &log)?;
        theirs.push((w, r));
        if let Some(v) = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            accuracy.1 = v["test_accuracy"].as_f64().unwrap_or(f64::NAN);
        }
    }
    let wall = |v: &[(f64, f64)]| median(&v.iter().map(|p| p.0).collect::<Vec<_>>());
    let rss = |v: &[(f64, f64)]| median(&v.iter().map(|p| p.1).collect::<Vec<_>>());
    let table = format!(
        "### End to end: `soup mix --method mehl+` against the authors' loop (PyTorch port)\n\n\
         Tiny CLIP ViT ({TINY_CLIP}), {AUTHORS_MODELS} models, b = {b}, {AUTHORS_EXAMPLES} held-out and test examples \
         (Fashion-MNIST), batch {batch}, E_in {epochs}, AdamW lr {lr}, seed {seed}; {} runs each, alternating.\n\n\
         | | wall (s) | peak RSS (MB) | test accuracy |\n|---|---|---|---|\n\
         | soup | {:.2} | {:.0} | {} |\n| authors' loop | {:.2} | {:.0} | {} |\n| soup / authors | {:.2} | {:.2} | |\n",
        o.repeats,
        wall(&ours),
        rss(&ours) / 1e6,
        fmt(accuracy.0, 4),
        wall(&theirs),
        rss(&theirs) / 1e6,
        fmt(accuracy.1, 4),
        wall(&ours) / wall(&theirs),
        rss(&ours) / rss(&theirs),
    );
    Ok((
        json!({ "soup": ours, "authors": theirs, "accuracy": [accuracy.0, accuracy.1],
                "time_ratio": wall(&ours) / wall(&theirs), "rss_ratio": rss(&ours) / rss(&theirs) }),
        table,
    ))
}

/// Checkpoint loading against copying.
fn load(o: &Options) -> Result<(Value, String), String> {
    let exe = release_example("load_bench")?;
    eprintln!("xtask: load");
    let lines = json_lines(
        Command::new(&exe)
            .args([
                "--models",
                "4",
                "--rounds",
                &(o.repeats * o.rounds).to_string(),
            ])
            .arg("--dir")
            .arg(root().join("target/bench/load-zoo")),
    )?;
    let m = |kind: &str| {
        lines
            .iter()
            .find(|l| l["kind"] == kind)
            .and_then(|l| l["median_gb_per_s"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let (copy, load) = (m("copy"), m("load"));
    let table = format!(
        "### Reading a zoo: 4 ViT-B/32 checkpoints (safetensors, f32) from the page cache\n\n\
         | copy bandwidth (GB/s) | checkpoint loading (GB/s) | loading / copy |\n|---|---|---|\n\
         | {copy:.2} | {load:.2} | {:.2} |\n",
        load / copy
    );
    Ok((json!({ "lines": lines, "ratio": load / copy }), table))
}

/// The allocators `alloc` compares: a name, and the environment a process gets.
const ALLOCATORS: &[(&str, &[(&str, &str)])] = &[
    ("soup: glibc malloc, freed memory kept (mallopt)", &[]),
    ("glibc malloc, defaults", &[("SOUP_BENCH_ALLOC", "system")]),
    (
        "glibc malloc, glibc.malloc.hugetlb=1",
        &[
            ("SOUP_BENCH_ALLOC", "system"),
            ("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1"),
        ],
    ),
    (
        "mimalloc 2.0 (LD_PRELOAD), large OS pages",
        &[
            ("SOUP_BENCH_ALLOC", "system"),
            ("LD_PRELOAD", MIMALLOC),
            ("MIMALLOC_ALLOW_LARGE_OS_PAGES", "1"),
        ],
    ),
    (
        "jemalloc 5 (LD_PRELOAD), thp:always",
        &[
            ("SOUP_BENCH_ALLOC", "system"),
            ("LD_PRELOAD", JEMALLOC),
            ("MALLOC_CONF", "thp:always,metadata_thp:always"),
        ],
    ),
];
const MIMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2";
const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";

/// The training step (ViT-B/32, the first batch size) and checkpoint loading per allocator.
fn alloc(o: &Options) -> Result<(Value, String), String> {
    ensure_packages(&[("libmimalloc2.0", MIMALLOC), ("libjemalloc2", JEMALLOC)])?;
    let (step_exe, load_exe) = (
        release_example("step_bench")?,
        release_example("load_bench")?,
    );
    let batch = o.batches.first().copied().unwrap_or(8).to_string();
    let zoo = root().join("target/bench/load-zoo");
    let mut runs: Vec<(Vec<Value>, Vec<Value>)> = vec![(Vec::new(), Vec::new()); ALLOCATORS.len()];
    for rep in 0..o.repeats {
        for ((name, env), (steps, loads)) in ALLOCATORS.iter().zip(runs.iter_mut()) {
            eprintln!("xtask: alloc, {name}, repeat {}", rep + 1);
            let envs = env.iter().copied();
            steps.extend(json_lines(
                Command::new(&step_exe)
                    .args(["--batch", &batch, "--rounds", &o.rounds.to_string()])
                    .envs(envs.clone()),
            )?);
            loads.extend(json_lines(
                Command::new(&load_exe)
                    .args(["--models", "4", "--rounds", &o.rounds.to_string()])
                    .arg("--dir")
                    .arg(&zoo)
                    .envs(envs),
            )?);
        }
    }
    let mut table = format!(
        "### Allocators: ViT-B/32 training step (batch {batch}) and checkpoint loading (4 models)\n\n\
         | allocator | step (s) | step / soup's | step peak RSS (GB) | loading (GB/s) | loading / soup's |\n\
         |---|---|---|---|---|---|\n"
    );
    let mut rows = Vec::new();
    let (mut base_step, mut base_load) = (f64::NAN, f64::NAN);
    for (i, ((name, _), (steps, loads))) in ALLOCATORS.iter().zip(&runs).enumerate() {
        let step = median(&seconds(steps, "phase", "step"));
        let load = median(
            &loads
                .iter()
                .filter(|l| l["kind"] == "load")
                .flat_map(|l| l["gb_per_s"].as_array().cloned().unwrap_or_default())
                .filter_map(|v| v.as_f64())
                .collect::<Vec<_>>(),
        );
        let rss = median(
            &steps
                .iter()
                .filter_map(|l| l["peak_rss_bytes"].as_f64())
                .collect::<Vec<_>>(),
        ) / 1e9;
        if i == 0 {
            (base_step, base_load) = (step, load);
        }
        table.push_str(&format!(
            "| {name} | {step:.3} | {:.2} | {rss:.2} | {load:.2} | {:.2} |\n",
            step / base_step,
            load / base_load
        ));
        rows.push(
            json!({ "allocator": name, "step_median_s": step, "load_median_gb_per_s": load,
                          "step_peak_rss_bytes": rss * 1e9, "steps": steps, "loads": loads }),
        );
    }
    table.push_str(&format!(
        "\n{} processes per allocator, alternating, each {} timed step rounds and {} loading rounds after a warm-up; medians over all rounds.\n",
        o.repeats, o.rounds, o.rounds
    ));
    Ok((json!(rows), table))
}

/// The BLAS libraries `gemm` compares with the `gemm` crate: a name, Debian's package, its
/// library.
const BLAS: &[(&str, &str, &str)] = &[
    (
        "BLIS",
        "libblis4-pthread",
        "/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4",
    ),
    (
        "OpenBLAS",
        "libopenblas0-pthread",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    ),
];

/// The products of a training step per model and batch: the `gemm` crate against BLAS.
fn gemm(o: &Options) -> Result<(Value, String), String> {
    let packages: Vec<(&str, &str)> = BLAS.iter().map(|(_, p, l)| (*p, *l)).collect();
    ensure_packages(&packages)?;
    let exe = release_example("gemm_bench")?;
    let mut lines = Vec::new();
    for rep in 0..o.repeats {
        eprintln!("xtask: gemm, repeat {}", rep + 1);
        let mut cmd = Command::new(&exe);
        cmd.args(["--reps", &o.rounds.to_string()]);
        for (name, _, lib) in BLAS {
            cmd.args(["--lib", &format!("{name}={lib}")]);
        }
        lines.extend(json_lines(
            cmd.env("OPENBLAS_NUM_THREADS", threads().to_string())
                .env("BLIS_NUM_THREADS", threads().to_string()),
        )?);
    }
    let names: Vec<&str> = std::iter::once("gemm")
        .chain(BLAS.iter().map(|(n, _, _)| *n))
        .collect();
    let mut table = format!(
        "### Matrix products of a training step (the 4 linear layers of a block, summed), CPU, {} threads\n\n\
         | model | batch | product | {} | {} |\n|---|---|---|{}{}\n",
        threads(),
        names.iter().map(|n| format!("{n} (ms)")).collect::<Vec<_>>().join(" | "),
        names[1..].iter().map(|n| format!("{n} / gemm")).collect::<Vec<_>>().join(" | "),
        "---|".repeat(names.len()),
        "---|".repeat(names.len() - 1),
    );
    let mut seen: Vec<(String, u64)> = Vec::new();
    for l in &lines {
        let key = (
            l["model"].as_str().unwrap_or("").to_string(),
            l["batch"].as_u64().unwrap_or(0),
        );
        if !seen.contains(&key) {
            seen.push(key);
        }
    }
    let mut rows = Vec::new();
    for (model, batch) in &seen {
        for product in ["forward", "grad_input", "grad_weight", "all"] {
            // Per implementation: the sum over layers of the median over all repetitions.
            let ms: Vec<f64> = names
                .iter()
                .map(|name| {
                    let mut per_layer: std::collections::BTreeMap<String, Vec<f64>> =
                        Default::default();
                    for l in lines.iter().filter(|l| {
                        l["model"] == model.as_str()
                            && l["batch"] == *batch
                            && l["impl"] == *name
                            && (product == "all" || l["product"] == product)
                    }) {
                        let key = format!("{}/{}", l["layer"], l["product"]);
                        per_layer.entry(key).or_default().extend(
                            l["seconds"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(Value::as_f64),
                        );
                    }
                    per_layer.values().map(|v| median(v)).sum::<f64>() * 1e3
                })
                .collect();
            table.push_str(&format!(
                "| {model} | {batch} | {product} | {} | {} |\n",
                ms.iter()
                    .map(|v| format!("{v:.1}"))
                    .collect::<Vec<_>>()
                    .join(" | "),
                ms[1..]
                    .iter()
                    .map(|v| format!("{:.2}", v / ms[0]))
                    .collect::<Vec<_>>()
                    .join(" | "),
            ));
            rows.push(json!({ "model": model, "batch": batch, "product": product,
                              "implementations": names, "ms": ms }));
        }
    }
    table.push_str(&format!(
        "\n{} processes, each {} timed repetitions of every product after a warm-up that is checked against the gemm crate's result; medians per product over all repetitions, summed over the layers.\n",
        o.repeats, o.rounds
    ));
    Ok((json!({ "rows": rows, "lines": lines }), table))
}

/// The training step with the gemm crate against the step with OpenBLAS (feature `openblas`).
fn blas_step(o: &Options) -> Result<(Value, String), String> {
    ensure_packages(crate::OPENBLAS_PACKAGES)?;
    let dir = root().join("target/bench");
    let mut exes = Vec::new();
    for (name, features) in [("gemm", None), ("openblas", Some("openblas"))] {
        let mut args = vec![
            "build",
            "--release",
            "-p",
            "soup-models",
            "--example",
            "step_bench",
        ];
        if let Some(f) = features {
            args.extend(["--features", f]);
        }
        crate::cargo(&args)?;
        let exe = dir.join(format!("step_bench-{name}"));
        std::fs::copy(root().join("target/release/examples/step_bench"), &exe)
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        exes.push((name, exe));
    }
    let mut table = String::from(
        "### ViT-B/32 training step: the gemm crate against OpenBLAS (feature `openblas`), CPU\n\n\
         | batch | phase | gemm (s) | OpenBLAS (s) | OpenBLAS / gemm |\n|---|---|---|---|---|\n",
    );
    let mut rows = Vec::new();
    for &batch in &o.batches {
        let mut lines: Vec<Vec<Value>> = vec![Vec::new(); exes.len()];
        for rep in 0..o.repeats {
            for ((name, exe), lines) in exes.iter().zip(lines.iter_mut()) {
                eprintln!("xtask: blas, batch {batch}, {name}, repeat {}", rep + 1);
                lines.extend(json_lines(Command::new(exe).args([
                    "--batch",
                    &batch.to_string(),
                    "--rounds",
                    &o.rounds.to_string(),
                ]))?);
            }
        }
        for phase in ["forward", "backward", "step"] {
            let (a, b) = (
                median(&seconds(&lines[0], "phase", phase)),
                median(&seconds(&lines[1], "phase", phase)),
            );
            table.push_str(&format!(
                "| {batch} | {phase} | {a:.3} | {b:.3} | {:.3} |\n",
                b / a
            ));
            rows.push(json!({ "batch": batch, "phase": phase, "gemm_median_s": a,
                              "openblas_median_s": b, "ratio": b / a }));
        }
    }
    table.push_str(&format!(
        "\n{} processes per binary and batch, alternating, {} timed rounds each after a warm-up; medians over all rounds.\n",
        o.repeats, o.rounds
    ));
    Ok((json!(rows), table))
}
