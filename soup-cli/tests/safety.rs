//! soup under hostile input and crashes: `--force` never deletes what soup did not write, a
//! failed run leaves nothing behind, bad input is exit code 2 with one line, outputs are
//! byte-identical for the same inputs, and a crash at any durable step of `mix` or `finetune`
//! resumes to the bits of an uninterrupted run.
//!
//! A small MLP zoo on Fashion-MNIST (Debian's `dataset-fashion-mnist`, installed by
//! `cargo xtask ci`) keeps each run under a second.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use soup_models::testkit::fixtures::ScratchDir;

const DATA: &str = "/usr/share/datasets/fashion-mnist";
const LIMIT: &str = "300";

mod common;

fn run_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    common::run(Some(dir), args, env)
}

fn ok_in(dir: &Path, args: &[&str]) -> String {
    let out = run_in(dir, args, &[]);
    assert!(
        out.status.success(),
        "soup {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Exit code 2, exactly one line on stderr, containing `what`, and no panic.
fn fails_in(dir: &Path, args: &[&str], what: &str) {
    let out = run_in(dir, args, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "soup {args:?}: {err}");
    assert!(
        err.contains(what),
        "soup {args:?}: expected {what:?} in {err:?}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "soup {args:?}: {err:?}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A base MLP and a zoo of three fine-tunes of it, made once; each test copies what it changes.
struct Zoo {
    _dir: ScratchDir,
    root: PathBuf,
}

fn search_toml(root: &Path) -> PathBuf {
    let search = root.join("search.toml");
    std::fs::write(
        &search,
        "lr = [1e-3, 3e-3]\nepochs = [1, 1]\nbatch_size = 50\n",
    )
    .unwrap();
    search
}

/// The base model and search of the shared zoo, copied into `dir` for a finetune of its own.
fn finetune_scratch(root: &Path, dir: &Path) {
    std::fs::copy(root.join("base.safetensors"), dir.join("base.safetensors")).unwrap();
    search_toml(dir);
}

fn zoo() -> &'static Zoo {
    static ZOO: OnceLock<Zoo> = OnceLock::new();
    ZOO.get_or_init(|| {
        assert!(
            Path::new(DATA).join("train-images-idx3-ubyte.gz").exists(),
            "Fashion-MNIST is missing from {DATA}: `cargo xtask ci` installs it \
             (apt-get install dataset-fashion-mnist)"
        );
        let dir = ScratchDir::new("safety");
        let root = dir.path().to_path_buf();
        std::fs::write(
            root.join("mlp.json"),
            r#"{"input": [1, 28, 28], "hidden": [24], "num_classes": 10}"#,
        )
        .unwrap();
        search_toml(&root);
        ok_in(
            &root,
            &[
                "train",
                "--arch",
                "mlp",
                "--config",
                "mlp.json",
                "--data",
                DATA,
                "--max-examples",
                LIMIT,
                "--out",
                "base.safetensors",
            ],
        );
        ok_in(&root, &finetune_args("zoo", 3));
        Zoo { _dir: dir, root }
    })
}

fn finetune_args(out: &str, count: usize) -> Vec<&'static str> {
    let count: &'static str = Box::leak(count.to_string().into_boxed_str());
    let out: &'static str = Box::leak(out.to_string().into_boxed_str());
    vec![
        "finetune",
        "--base",
        "base.safetensors",
        "--data",
        DATA,
        "--max-examples",
        LIMIT,
        "--count",
        count,
        "--search",
        "search.toml",
        "--out",
        out,
    ]
}

fn mix_args<'a>(method: &'a str, zoo: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "mix",
        "--method",
        method,
        "--zoo",
        zoo,
        "--data",
        DATA,
        "--max-examples",
        LIMIT,
        "--out",
        out,
        "--model-batch",
        "1",
        "--inner-epochs",
        "1",
        "--batch-size",
        "100",
    ]
}

/// The names of the entries of `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Copies a directory tree (files and directories).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn force_never_deletes_what_soup_did_not_write() {
    let zoo = zoo();
    let root = &zoo.root;
    let before = listing(root);
    // `--out .`, `..`, `/`: refused before any work, nothing deleted.
    for out in [".", "..", "/"] {
        let out_run = run_in(
            root,
            &mix_args("uniform", "zoo", out)
                .iter()
                .chain(["--force"].iter())
                .copied()
                .collect::<Vec<_>>(),
            &[],
        );
        let err = String::from_utf8_lossy(&out_run.stderr);
        assert_eq!(out_run.status.code(), Some(2), "--out {out}: {err}");
        assert!(
            err.contains("will not replace") || err.contains("not a directory name"),
            "--out {out}: {err}"
        );
    }
    assert_eq!(listing(root), before, "a refused --force deleted something");
    // The home directory.
    let home = ScratchDir::new("safety-home");
    std::fs::write(home.path().join("precious.txt"), "mine").unwrap();
    let home_s = home.path().display().to_string();
    let mut args = mix_args("uniform", "zoo", &home_s);
    args.push("--force");
    let out = run_in(root, &args, &[("HOME", home_s.as_str())]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("home directory"));
    assert!(home.path().join("precious.txt").exists());
    // A directory holding an input (the zoo itself, or its parent).
    let mut args = mix_args("uniform", "zoo", "zoo");
    args.push("--force");
    fails_in(root, &args, "will not replace");
    assert_eq!(listing(&root.join("zoo")).len(), 4);
    // A directory with foreign files.
    let foreign = root.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let mut args = mix_args("uniform", "zoo", "foreign");
    args.push("--force");
    fails_in(root, &args, "not written by soup");
    assert!(foreign.join("notes.txt").exists());
    // soup's own output is replaced; once a foreign file is added to it, it is not.
    ok_in(root, &mix_args("uniform", "zoo", "own"));
    let mut args = mix_args("uniform", "zoo", "own");
    args.push("--force");
    ok_in(root, &args);
    std::fs::write(root.join("own/mine.txt"), "mine").unwrap();
    fails_in(root, &args, "mine.txt");
    assert!(root.join("own/mine.txt").exists() && root.join("own/model.safetensors").exists());
    // Without --force an existing OUT is never touched.
    fails_in(root, &mix_args("uniform", "zoo", "own"), "already exists");
    // `--out FILE` fails before the work.
    std::fs::write(root.join("a-file"), "x").unwrap();
    fails_in(
        root,
        &mix_args("uniform", "zoo", "a-file"),
        "not a directory",
    );
    assert_eq!(std::fs::read_to_string(root.join("a-file")).unwrap(), "x");
}

/// Copies the zoo into `dir/name` and returns its path.
fn zoo_copy(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    copy_tree(&zoo().root.join("zoo"), &to);
    to
}

/// Overwrites the first f32 of tensor `tensor` of a safetensors file with `value`.
fn poison(path: &Path, tensor: &str, value: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header[tensor]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
    bytes[start..start + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn failed_runs_leave_nothing_behind_and_bad_members_are_named() {
    let zoo = zoo();
    let dir = ScratchDir::new("safety-fail");
    let d = dir.path();
    std::fs::copy(
        zoo.root.join("base.safetensors"),
        d.join("base.safetensors"),
    )
    .unwrap();
    // A NaN, and an infinity, in a member: refused by every method, naming member and tensor.
    for (name, value) in [("nan", f32::NAN), ("inf", f32::INFINITY)] {
        let z = zoo_copy(d, name);
        poison(
            &z.join("model-01/model.safetensors"),
            "layers.0.weight",
            value,
        );
        for method in ["uniform", "greedy", "learned+", "mehl+"] {
            let out = format!("out-{name}-{method}");
            fails_in(d, &mix_args(method, name, &out), "model-01");
            fails_in(d, &mix_args(method, name, &out), "NaN or infinite");
        }
    }
    // A truncated member.
    let z = zoo_copy(d, "truncated");
    let m = z.join("model-02/model.safetensors");
    let bytes = std::fs::read(&m).unwrap();
    std::fs::write(&m, &bytes[..bytes.len() - 100]).unwrap();
    fails_in(
        d,
        &mix_args("mehl+", "truncated", "out-truncated"),
        "truncated",
    );
    // A member of another shape.
    let z = zoo_copy(d, "mismatch");
    std::fs::write(
        d.join("mlp-wide.json"),
        r#"{"input": [1, 28, 28], "hidden": [12], "num_classes": 10}"#,
    )
    .unwrap();
    ok_in(
        d,
        &[
            "train",
            "--arch",
            "mlp",
            "--config",
            "mlp-wide.json",
            "--data",
            DATA,
            "--max-examples",
            "100",
            "--out",
            "mismatch/model-02/model.safetensors",
        ],
    );
    let _ = z;
    fails_in(
        d,
        &mix_args("uniform", "mismatch", "out-mismatch"),
        "model-02",
    );
    // A zoo.toml entry that is missing.
    let z = zoo_copy(d, "missing");
    std::fs::remove_dir_all(z.join("model-01")).unwrap();
    fails_in(d, &mix_args("mehl+", "missing", "out-missing"), "model-01");
    // A refused .pt.
    let z = d.join("badpt");
    std::fs::create_dir_all(&z).unwrap();
    std::fs::write(z.join("a.pt"), b"PK\x03\x04 not a zip").unwrap();
    fails_in(d, &mix_args("uniform", "badpt", "out-badpt"), "a.pt");
    // No held-out data.
    let empty = d.join("empty-data");
    std::fs::create_dir_all(&empty).unwrap();
    let mut args = mix_args("uniform", "zoo-ok", "out-nodata");
    zoo_copy(d, "zoo-ok");
    args[6] = "empty-data";
    fails_in(d, &args, "unknown data set layout");
    let left: Vec<String> = listing(d)
        .into_iter()
        .filter(|n| n.starts_with("out-"))
        .collect();
    assert!(left.is_empty(), "failed runs left {left:?}");
}

/// A member that only a later model batch loads is found bad after earlier batches were saved:
/// the error says that `OUT.partial/` keeps them and how to continue, and replacing the member
/// and rerunning with `--resume` finishes the soup.
#[test]
fn a_bad_member_found_in_a_later_model_batch_says_how_to_resume() {
    let dir = ScratchDir::new("safety-later");
    let d = dir.path();
    let mut found = false;
    for k in 0..3 {
        let name = format!("later-{k}");
        let z = zoo_copy(d, &name);
        let member = z.join(format!("model-{k:02}/model.safetensors"));
        let good = std::fs::read(&member).unwrap();
        poison(&member, "layers.0.weight", f32::NAN);
        let out = format!("out-later-{k}");
        let run = run_in(d, &mix_args("mehl+", &name, &out), &[]);
        let err = String::from_utf8_lossy(&run.stderr).into_owned();
        assert_eq!(run.status.code(), Some(2), "{err}");
        assert!(err.contains(&format!("model-{k:02}")), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        if !d
            .join(format!("{out}.partial/progress.safetensors"))
            .exists()
        {
            continue;
        }
        found = true;
        assert!(err.contains(&format!("{out}.partial keeps the")), "{err}");
        assert!(err.contains("--resume"), "{err}");
        std::fs::write(&member, good).unwrap();
        let mut resume = mix_args("mehl+", &name, &out);
        resume.push("--resume");
        ok_in(d, &resume);
        assert!(d.join(&out).join("model.safetensors").exists());
    }
    assert!(
        found,
        "no member was first found bad in a later model batch"
    );
}

/// `soup finetune` that fails on a full disk before its first model is complete leaves no zoo
/// directory behind.
#[test]
fn finetune_on_a_full_disk_leaves_no_zoo_behind() {
    let dir = ScratchDir::new("safety-full");
    let d = dir.path();
    finetune_scratch(&zoo().root, d);
    let out = run_in(d, &finetune_args("zoo-full", 2), &[("SOUP_DISK_FULL", "1")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!d.join("zoo-full").exists(), "{:?}", listing(d));
}

#[test]
fn bad_flags_and_configs_get_one_line_and_exit_code_two() {
    let zoo = zoo();
    let dir = ScratchDir::new("safety-flags");
    let d = dir.path();
    copy_tree(&zoo.root, d);
    let mut a = mix_args("mehl+", "zoo", "o1");
    a.extend(["--label-smoothing", "5"]);
    fails_in(d, &a, "--label-smoothing");
    let mut a = mix_args("mehl+", "zoo", "o2");
    a.push("--clip-grad-norm=-1");
    fails_in(d, &a, "--clip-grad-norm");
    fails_in(
        d,
        &mix_args("soup-of-the-day", "zoo", "o3"),
        "invalid value 'soup-of-the-day'",
    );
    // An unknown matrix-product kernel set is refused before anything is written.
    let out = run_in(
        d,
        &mix_args("mehl+", "zoo", "o4"),
        &[("SOUP_GEMM_KERNELS", "avx1024")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("SOUP_GEMM_KERNELS=\"avx1024\""), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    assert!(!d.join("o4").exists());
    let train = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = vec![
            "train",
            "--data",
            DATA,
            "--max-examples",
            "100",
            "--out",
            "t.safetensors",
        ];
        v.extend(extra);
        v
    };
    fails_in(
        d,
        &train(&["--init", "base.safetensors", "--clip-grad-norm=-1"]),
        "clip_grad_norm",
    );
    fails_in(
        d,
        &train(&["--init", "base.safetensors", "--crop-padding", "1000000"]),
        "crop_padding",
    );
    for (config, what) in [
        (
            r#"{"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_channels": 1, "image_size": 0, "patch_size": 7, "projection_dim": 8}"#,
            "image_size",
        ),
        (
            r#"{"hidden_size": 0, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_channels": 1, "image_size": 28, "patch_size": 7, "projection_dim": 8}"#,
            "hidden_size",
        ),
    ] {
        std::fs::write(d.join("c.json"), config).unwrap();
        fails_in(
            d,
            &train(&["--arch", "clip-vit", "--config", "c.json"]),
            what,
        );
    }
    std::fs::write(
        d.join("m.json"),
        r#"{"input": [1, 28, 28], "hidden": [0], "num_classes": 10}"#,
    )
    .unwrap();
    fails_in(
        d,
        &train(&["--arch", "mlp", "--config", "m.json"]),
        "hidden widths",
    );
    fails_in(
        d,
        &[
            "eval",
            "--model",
            "base.safetensors",
            "--data",
            DATA,
            "--max-examples",
            "0",
        ],
        "--max-examples",
    );
    // A one-class data set, and idx files of 0 × 0 images.
    let idx = |dir: &str, h: u8, labels: &[u8]| {
        let p = d.join(dir);
        std::fs::create_dir_all(&p).unwrap();
        let n = labels.len() as u8;
        for prefix in ["train", "t10k"] {
            let mut images = vec![0, 0, 8, 3, 0, 0, 0, n, 0, 0, 0, h, 0, 0, 0, h];
            images.extend(std::iter::repeat_n(
                7u8,
                labels.len() * h as usize * h as usize,
            ));
            std::fs::write(p.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
            let mut l = vec![0, 0, 8, 1, 0, 0, 0, n];
            l.extend(labels);
            std::fs::write(p.join(format!("{prefix}-labels-idx1-ubyte")), l).unwrap();
        }
    };
    idx("one-class", 28, &[3; 20]);
    idx("zero-size", 0, &[0, 1, 2]);
    for (data, what) in [("one-class", "single class"), ("zero-size", "0 × 0")] {
        fails_in(
            d,
            &[
                "train",
                "--init",
                "base.safetensors",
                "--data",
                data,
                "--out",
                "t.safetensors",
            ],
            what,
        );
    }
    assert!(!d.join("t.safetensors").exists());
}

/// Every file of `dir` but the report (which records timings), as bytes.
fn output_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    listing(dir)
        .into_iter()
        .filter(|n| n != "report.json")
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).unwrap();
            (n, bytes)
        })
        .collect()
}

#[test]
fn the_same_inputs_and_seed_give_byte_identical_outputs() {
    let zoo = zoo();
    let dir = ScratchDir::new("safety-bits");
    let d = dir.path();
    copy_tree(&zoo.root, d);
    for method in ["uniform", "learned+", "mehl+"] {
        let (a, b) = (format!("a-{method}"), format!("b-{method}"));
        ok_in(d, &mix_args(method, "zoo", &a));
        ok_in(d, &mix_args(method, "zoo", &b));
        let (x, y) = (output_bytes(&d.join(&a)), output_bytes(&d.join(&b)));
        assert_eq!(x.len(), y.len());
        for ((n, p), (_, q)) in x.iter().zip(&y) {
            assert!(p == q, "{method}: {n} differs between two identical runs");
        }
    }
}

/// The durable steps a run reaches, from `SOUP_CRASH_TRACE`.
fn trace(dir: &Path, args: &[&str]) -> usize {
    let file = dir.join("trace.txt");
    let _ = std::fs::remove_file(&file);
    let out = run_in(dir, args, &[("SOUP_CRASH_TRACE", file.to_str().unwrap())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    text.lines().count()
}

#[test]
fn a_crash_at_every_durable_step_of_mix_resumes_to_the_same_soup() {
    let zoo = zoo();
    let dir = ScratchDir::new("safety-crash-mix");
    let d = dir.path();
    copy_tree(&zoo.root, d);
    for method in ["mehl+", "uniform"] {
        let whole = format!("whole-{method}");
        let steps = trace(d, &mix_args(method, "zoo", &whole));
        assert!(steps >= 10, "{method}: only {steps} durable steps traced");
        let expected = output_bytes(&d.join(&whole));
        for k in 1..=steps {
            let out = format!("crash-{method}-{k}");
            let at = k.to_string();
            let crashed = run_in(d, &mix_args(method, "zoo", &out), &[("SOUP_CRASH_AT", &at)]);
            assert_eq!(
                crashed.status.code(),
                Some(137),
                "{method} step {k}: did not crash"
            );
            let out_dir = d.join(&out);
            let partial = d.join(format!("{out}.partial"));
            if out_dir.exists() {
                // Only ever complete.
                assert!(
                    !partial.exists(),
                    "{method} step {k}: OUT and OUT.partial both exist"
                );
            } else {
                let mut args = mix_args(method, "zoo", &out);
                if partial.exists() {
                    args.push("--resume");
                }
                ok_in(d, &args);
                assert!(!partial.exists(), "{method} step {k}: OUT.partial left");
            }
            let got = output_bytes(&out_dir);
            assert_eq!(
                got.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                expected.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                "{method} step {k}"
            );
            for ((n, p), (_, q)) in got.iter().zip(&expected) {
                assert!(
                    p == q,
                    "{method}: crash at step {k}: {n} differs after resuming"
                );
            }
            std::fs::remove_dir_all(&out_dir).unwrap();
        }
    }
}

#[test]
fn finetune_is_durable_model_by_model_and_resumes_to_the_same_zoo() {
    let zoo = zoo();
    let dir = ScratchDir::new("safety-crash-ft");
    let d = dir.path();
    finetune_scratch(&zoo.root, d);
    let steps = trace(d, &finetune_args("whole", 3));
    assert!(steps >= 9, "only {steps} durable steps traced");
    let bits = |zoo: &Path| -> Vec<(String, Vec<u8>)> {
        (0..3)
            .map(|i| {
                let name = format!("model-{i:02}/model.safetensors");
                (name.clone(), std::fs::read(zoo.join(&name)).unwrap())
            })
            .collect()
    };
    let expected = bits(&d.join("whole"));
    assert_eq!(
        expected,
        bits(&zoo.root.join("zoo")),
        "two identical finetunes differ"
    );
    for k in 1..=steps {
        let out = format!("crash-{k}");
        let at = k.to_string();
        let crashed = run_in(d, &finetune_args(&out, 3), &[("SOUP_CRASH_AT", &at)]);
        assert_eq!(crashed.status.code(), Some(137), "step {k}: did not crash");
        let zoo_dir = d.join(&out);
        if zoo_dir.join("zoo.toml").exists() {
            let text = std::fs::read_to_string(zoo_dir.join("zoo.toml")).unwrap();
            let listed = text.matches("[[model]]").count();
            if listed < 3 {
                // An unfinished zoo is refused by mix, naming what is missing.
                fails_in(d, &mix_args("uniform", &out, "never"), "incomplete zoo");
            }
            let mut args = finetune_args(&out, 3);
            args.push("--resume");
            ok_in(d, &args);
        } else {
            ok_in(d, &finetune_args(&out, 3));
        }
        assert_eq!(bits(&zoo_dir), expected, "crash at step {k}");
        let hidden: Vec<String> = listing(&zoo_dir)
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "crash at step {k} left {hidden:?}");
    }
    assert!(!d.join("never").exists());
}

#[test]
fn finetune_force_replaces_only_a_zoo_soup_made() {
    let zoo = zoo();
    let dir = ScratchDir::new("safety-ft-force");
    let d = dir.path();
    finetune_scratch(&zoo.root, d);
    // A hand-written zoo.toml is not soup's: --force refuses it.
    std::fs::create_dir_all(d.join("hand")).unwrap();
    std::fs::write(d.join("hand/zoo.toml"), "[[model]]\npath = \"/etc\"\n").unwrap();
    let mut args = finetune_args("hand", 1);
    args.push("--force");
    fails_in(d, &args, "not written by `soup finetune`");
    assert!(Path::new("/etc").exists());
    // A zoo of soup's with a foreign file in a model directory: refused, the file kept.
    ok_in(d, &finetune_args("mine", 1));
    std::fs::write(d.join("mine/model-00/notes.txt"), "mine").unwrap();
    let mut args = finetune_args("mine", 1);
    args.push("--force");
    fails_in(d, &args, "did not write");
    assert!(d.join("mine/model-00/notes.txt").exists());
    std::fs::remove_file(d.join("mine/model-00/notes.txt")).unwrap();
    ok_in(d, &args);
    fails_in(d, &finetune_args("mine", 1), "--resume continues it");
}
