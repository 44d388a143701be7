//! Pieces the subcommands share: data loading, progress bars, memory figures.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use soup_models::data::{prepare, DataSpec, Heldout, Preprocess, RawImages, Split};
use soup_models::remote::{Download, OnDownload};
use soup_models::{Architecture, Dataset, DeviceSpec};

use crate::error::{CliError, Result};

/// Where the labelled data comes from and how it is split.
#[derive(clap::Args, Clone, Debug)]
pub struct DataArgs {
    /// Data set: `fashion-mnist` (the Debian package's files) or a directory holding idx files,
    /// CIFAR .bin files, or train/<class>/ and val/<class>/ image folders; for a language model,
    /// a folder of text (train/ and test/), or several joined by `+` (one domain each).
    #[arg(long)]
    pub data: String,
    /// Fraction of the training split held out for choosing soups.
    #[arg(long, default_value_t = 0.1)]
    pub heldout_fraction: f64,
    /// Seed of the held-out split.
    #[arg(long, default_value_t = 0)]
    pub heldout_seed: u64,
    /// Held-out split as indices into the training split, one per line (replaces the fraction).
    #[arg(long)]
    pub heldout_index: Option<PathBuf>,
    /// Use at most this many examples of each split (for quick runs).
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// How image-folder images are resized and cropped: `clip` (OpenAI's preprocess, as
    /// model-soups and open_clip; Pillow's bicubic, bit for bit) or `hf-clip` (transformers'
    /// CLIPImageProcessorPil: the crop offset of an odd margin rounds down).
    #[arg(long, default_value = "clip", value_parser = preprocess_parser())]
    pub preprocess: Preprocess,
    /// Language models: tokens per window of a text data set (each window predicts its tokens
    /// 2 … seq-len from the ones before); `--max-examples` counts windows.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
}

/// One domain of a text data set: its name (the folder's, or the path where two folders share a
/// name) and its windows of one split.
pub struct Domain {
    pub name: String,
    pub windows: Vec<Vec<u32>>,
}

/// `--device`: where the model is computed.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DeviceArgs {
    /// Device the model is computed on: cpu, cuda (GPU 0, or the local rank's GPU under MPI),
    /// cuda:N, or auto (a GPU when this build and machine have one, else the CPU). CUDA needs a
    /// soup built with `--features cuda`. Data sets stay in host memory.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

impl DeviceArgs {
    /// The device, the local rank's GPU when `cuda` names none.
    pub fn open(&self) -> Result<Device> {
        Ok(self.device.open(soup_models::device::local_rank())?)
    }
}

/// `--arch-config`: configuration values that replace what a checkpoint states or what soup
/// inferred by rule (`soup inspect` lists those).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ArchOverride {
    /// Architecture settings that replace the checkpoint's or soup's inference: a JSON object
    /// or a file holding one, e.g. '{"num_attention_heads": 4}' for an OpenAI .pt whose heads
    /// are not 64 wide (.pt files do not store the head count).
    #[arg(long)]
    pub arch_config: Option<String>,
    /// The names of the head's classes, one per line in its order: they supply or replace the
    /// model's (`id2label`), and evaluation folders are matched to them by name.
    #[arg(long)]
    pub class_names: Option<std::path::PathBuf>,
}

/// The class names of `path`, one per line (a final line break is optional); an empty line or
/// a name given twice is an error naming the file and the line.
pub fn read_class_names(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| crate::error::io(path, e))?;
    let mut names: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let name = line.trim_end_matches('\r');
        if name.trim().is_empty() {
            return Err(CliError::new(format!(
                "--class-names {}: line {} is empty",
                path.display(),
                i + 1
            )));
        }
        if let Some(first) = names.iter().position(|n| n == name) {
            return Err(CliError::new(format!(
                "--class-names {}: line {} repeats {name:?} of line {}",
                path.display(),
                i + 1,
                first + 1
            )));
        }
        names.push(name.to_string());
    }
    if names.is_empty() {
        return Err(CliError::new(format!(
            "--class-names {}: no names",
            path.display()
        )));
    }
    Ok(names)
}

impl ArchOverride {
    /// The override as a JSON object (empty when not given).
    pub fn map(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let mut map = self.config_map()?;
        if let Some(path) = &self.class_names {
            map.insert(
                soup_models::arch::labels::CLASS_NAMES_KEY.into(),
                serde_json::json!(read_class_names(path)?),
            );
        }
        Ok(map)
    }

    /// `--arch-config` as a JSON object.
    fn config_map(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let Some(given) = &self.arch_config else {
            return Ok(serde_json::Map::new());
        };
        let path = std::path::Path::new(given);
        let text = if path.is_file() {
            std::fs::read_to_string(path).map_err(|e| crate::error::io(path, e))?
        } else {
            given.clone()
        };
        match serde_json::from_str(&text) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            _ => Err(CliError::new(format!(
                "--arch-config {given:?}: expected a JSON object such as '{{\"num_attention_heads\": 4}}'"
            ))),
        }
    }

    /// The checkpoint's architecture with the override applied.
    pub fn architecture(&self, ckpt: &soup_models::Checkpoint) -> Result<Arc<dyn Architecture>> {
        Ok(ckpt.architecture_with(&self.map()?)?)
    }
}

/// `--preprocess`: one of [`Preprocess::NAMES`], listed in `--help`.
fn preprocess_parser() -> impl clap::builder::TypedValueParser<Value = Preprocess> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Preprocess::NAMES)
        .map(|s| s.parse::<Preprocess>().expect("a listed name"))
}

impl DataArgs {
    pub fn spec(&self) -> DataSpec {
        let mut spec = DataSpec::new(&self.data);
        spec.preprocess = self.preprocess;
        spec.heldout = match &self.heldout_index {
            Some(path) => Heldout::IndexFile(path.clone()),
            None => Heldout::Fraction {
                fraction: self.heldout_fraction,
                seed: self.heldout_seed,
            },
        };
        spec
    }

    /// Split `split`, capped at `max_examples`, prepared for `arch`; every label must have a
    /// class in the model's head.
    /// An image folder is streamed (decoded batch by batch, straight to the model's size); the
    /// other formats are small and read whole.
    pub fn load(&self, split: Split, arch: &Arc<dyn Architecture>) -> Result<Dataset> {
        if self.max_examples == Some(0) {
            return Err(CliError::new("--max-examples must be at least 1"));
        }
        let spec = self.spec();
        if !spec.is_image_folder()? {
            return self.prepare(&self.load_raw(split)?, arch);
        }
        let head = soup_models::data::HeadClasses {
            names: arch.class_names().map(<[String]>::to_vec),
            count: Some(arch.num_classes()),
        };
        let data = spec.stream(split, &arch.image_input()?, self.max_examples, &head)?;
        self.check_labels(&data.labels, arch)?;
        Ok(data)
    }

    /// `arch` as training on this data set leaves it: a model trained on an image folder whose
    /// class folders its names do not all cover (or that has none) takes the names of
    /// `train/`'s class folders, sorted (the order its labels then follow), where they are as
    /// many as its classes.
    pub fn name_classes(&self, arch: Arc<dyn Architecture>) -> Result<Arc<dyn Architecture>> {
        let spec = self.spec();
        if !matches!(arch.input(), soup_models::InputSpec::Images(_))
            || !spec.is_image_folder()?
            || !spec.root.join("train").is_dir()
        {
            return Ok(arch);
        }
        let folders = soup_models::data::class_folders(&spec.root.join("train"))?;
        let covered = arch
            .class_names()
            .is_some_and(|names| folders.iter().all(|f| names.contains(f)));
        if covered || folders.len() != arch.num_classes() {
            return Ok(arch);
        }
        Ok(soup_models::arch::labels::with_class_names(
            arch,
            Some(folders),
        )?)
    }

    /// Split `split` as stored, capped at `max_examples`.
    pub fn load_raw(&self, split: Split) -> Result<RawImages> {
        if self.max_examples == Some(0) {
            return Err(CliError::new("--max-examples must be at least 1"));
        }
        let mut raw = self.spec().load(split)?;
        if let Some(m) = self.max_examples {
            let rows: Vec<usize> = (0..raw.len().min(m)).collect();
            raw = raw.subset(&rows);
        }
        Ok(raw)
    }

    /// `raw` prepared for `arch`, after checking that every label has a class in its head.
    pub fn prepare(&self, raw: &RawImages, arch: &Arc<dyn Architecture>) -> Result<Dataset> {
        self.check_labels(&raw.labels, arch)?;
        Ok(prepare(raw, &arch.image_input()?, &Device::Cpu)?)
    }

    /// Every label must have a class in the model's head.
    fn check_labels(&self, labels: &[u32], arch: &Arc<dyn Architecture>) -> Result<()> {
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= arch.num_classes()) {
            return Err(CliError::new(format!(
                "{}: label {bad} has no class in the model's head ({} classes)",
                self.data,
                arch.num_classes()
            )));
        }
        Ok(())
    }

    /// The training split, refused when it holds fewer than two classes (nothing to learn: a
    /// classifier of one class scores 1.0 on it whatever its weights).
    pub fn load_train(&self, arch: &Arc<dyn Architecture>) -> Result<Dataset> {
        let train = self.load(Split::Train, arch)?;
        let first = train.labels.first().copied();
        if train.labels.iter().all(|&l| Some(l) == first) {
            return Err(CliError::new(format!(
                "{}: the training split holds a single class: nothing to learn",
                self.data
            )));
        }
        Ok(train)
    }

    /// The text data sets `--data` names: `a+b+c` is a union of text data sets, one domain each
    /// (a path that exists as it is names one, `+` and all).
    pub fn domains(&self) -> Vec<String> {
        if !self.data.contains('+') || std::path::Path::new(&self.data).exists() {
            return vec![self.data.clone()];
        }
        self.data
            .split('+')
            .map(|d| d.trim().to_string())
            .filter(|d| !d.is_empty())
            .collect()
    }

    /// The windows of `split` of a text data set, tokenised with the tokenizer of the language
    /// model in `model_dir`, domain by domain: at most `--max-examples` of `--seq-len` tokens
    /// per domain, which the model's positions must cover.
    pub fn load_domains(
        &self,
        split: Split,
        model_dir: &std::path::Path,
        spec: &soup_models::arch::TokenSpec,
    ) -> Result<Vec<Domain>> {
        self.check_text(spec)?;
        let (tokenizer, eos) = soup_models::data::text::model_tokenizer(model_dir)?;
        let heldout = self.spec().heldout;
        let roots = self.domains();
        let names = self.domain_names();
        roots
            .iter()
            .zip(&names)
            .map(|(root, name)| {
                let windows = soup_models::data::text::windows(
                    std::path::Path::new(root),
                    (split, &heldout),
                    &tokenizer,
                    eos,
                    self.seq_len,
                    self.max_examples,
                )?;
                Ok(Domain {
                    name: name.clone(),
                    windows,
                })
            })
            .collect()
    }

    /// `--max-examples` and `--seq-len` checked for a language model of `spec`.
    fn check_text(&self, spec: &soup_models::arch::TokenSpec) -> Result<()> {
        if self.max_examples == Some(0) {
            return Err(CliError::new("--max-examples must be at least 1"));
        }
        if self.seq_len > spec.max_positions {
            return Err(CliError::new(format!(
                "--seq-len {}: beyond the model's {} positions",
                self.seq_len, spec.max_positions
            )));
        }
        Ok(())
    }

    /// The domains' names: their last path components, or the whole paths where those repeat.
    fn domain_names(&self) -> Vec<String> {
        let roots = self.domains();
        let short = |d: &str| {
            std::path::Path::new(d)
                .file_name()
                .map_or(d.to_string(), |f| f.to_string_lossy().into_owned())
        };
        let names: Vec<String> = roots.iter().map(|d| short(d)).collect();
        let unique = (1..names.len()).all(|i| !names[..i].contains(&names[i]));
        match unique {
            true => names,
            false => roots,
        }
    }

    /// Calls `each(d, window)` with the windows of `split` of every domain d in turn
    /// (`--max-examples` of each at most), streamed from the files; returns each domain's name
    /// and windows given, an error naming a domain without one.
    pub fn visit_domains(
        &self,
        split: Split,
        model_dir: &std::path::Path,
        spec: &soup_models::arch::TokenSpec,
        mut each: impl FnMut(usize, Vec<u32>) -> Result<()>,
    ) -> Result<Vec<(String, usize)>> {
        self.check_text(spec)?;
        let (tokenizer, eos) = soup_models::data::text::model_tokenizer(model_dir)?;
        let heldout = self.spec().heldout;
        let mut out = Vec::new();
        for (d, (root, name)) in self.domains().iter().zip(self.domain_names()).enumerate() {
            let mut failed = None;
            let given = soup_models::data::text::visit_windows(
                std::path::Path::new(root),
                (split, &heldout),
                (&tokenizer, eos),
                self.seq_len,
                self.max_examples,
                |w| match each(d, w) {
                    Ok(()) => Ok(true),
                    Err(e) => {
                        failed = Some(e);
                        Ok(false)
                    }
                },
            )?;
            if let Some(e) = failed {
                return Err(e);
            }
            if given == 0 {
                // The split's own error, naming it.
                soup_models::data::text::windows(
                    std::path::Path::new(root),
                    (split, &heldout),
                    &tokenizer,
                    eos,
                    self.seq_len,
                    Some(1),
                )?;
            }
            out.push((name, given));
        }
        Ok(out)
    }

    /// The windows of `split` of every domain (`--max-examples` of each at most) for a run that
    /// reads them again and again: domain d's held in memory up to `spill(d).1` bytes, else in
    /// the file `spill(d).0` (see [`soup_models::data::text::spillable_windows`]).
    pub fn load_spilled_domains(
        &self,
        split: Split,
        model_dir: &std::path::Path,
        spec: &soup_models::arch::TokenSpec,
        spill: impl Fn(usize) -> (std::path::PathBuf, usize),
    ) -> Result<Vec<(String, soup_models::data::text::SpillableWindows)>> {
        self.check_text(spec)?;
        let (tokenizer, eos) = soup_models::data::text::model_tokenizer(model_dir)?;
        let heldout = self.spec().heldout;
        self.domains()
            .iter()
            .zip(self.domain_names())
            .enumerate()
            .map(|(d, (root, name))| {
                let (path, memory) = spill(d);
                let windows = soup_models::data::text::spillable_windows(
                    std::path::Path::new(root),
                    (split, &heldout),
                    (&tokenizer, eos),
                    (self.seq_len, self.max_examples),
                    (&path, memory),
                )?;
                Ok((name, windows))
            })
            .collect()
    }

    /// The number of classes of the training split.
    pub fn num_classes(&self) -> Result<usize> {
        Ok(self.spec().num_classes()?)
    }
}

/// How often a plain progress line is printed when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(10);

/// Progress of a long phase on stderr, with rate and ETA: a bar on a terminal; elsewhere (a log
/// file, CI, `cargo xtask reproduce`) a plain line every [`LINE_EVERY`] and one at the end;
/// nothing with `--quiet`.
pub enum Progress {
    Bar(ProgressBar),
    Lines(Mutex<Lines>),
    Hidden,
}

/// The state of a plain-line progress report.
pub struct Lines {
    what: String,
    len: u64,
    pos: u64,
    /// Position and time when this run of the phase started (a resumed run starts past 0).
    start: (u64, Instant),
    last: Instant,
    prefix: String,
}

impl Lines {
    /// `what: pos/len (pct %), rate/s, eta, elapsed, prefix`.
    fn line(&self) -> String {
        let elapsed = self.start.1.elapsed().as_secs_f64();
        let done = self.pos.saturating_sub(self.start.0) as f64;
        let rate = done / elapsed.max(1e-9);
        let left = self.len.saturating_sub(self.pos) as f64;
        let eta = if rate > 0.0 {
            format!("eta {}", clock(left / rate))
        } else {
            "eta ?".to_string()
        };
        let pct = 100.0 * self.pos as f64 / self.len.max(1) as f64;
        format!(
            "{}: {}/{} ({pct:.0} %), {rate:.2}/s, {eta}, elapsed {} {}",
            self.what,
            self.pos,
            self.len,
            clock(elapsed),
            self.prefix
        )
        .trim_end()
        .to_string()
    }
}

/// Seconds as `1h02m`, `3m05s` or `12s`.
pub fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

impl Progress {
    /// Progress of `len` units of `what`.
    pub fn new(quiet: bool, len: usize, what: &str) -> Self {
        if quiet {
            return Progress::Hidden;
        }
        if !std::io::stderr().is_terminal() {
            let now = Instant::now();
            return Progress::Lines(Mutex::new(Lines {
                what: what.to_string(),
                len: len as u64,
                pos: 0,
                start: (0, now),
                last: now,
                prefix: String::new(),
            }));
        }
        let bar = ProgressBar::new(len as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {prefix}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        Progress::Bar(bar)
    }

    fn lines(m: &Mutex<Lines>) -> std::sync::MutexGuard<'_, Lines> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn inc(&self, n: u64) {
        match self {
            Progress::Bar(b) => b.inc(n),
            Progress::Lines(m) => {
                let mut l = Self::lines(m);
                l.pos += n;
                if l.last.elapsed() >= LINE_EVERY && l.pos < l.len {
                    l.last = Instant::now();
                    eprintln!("{}", l.line());
                }
            }
            Progress::Hidden => {}
        }
    }

    /// Where a resumed phase starts (rates and ETA count from here).
    pub fn set_position(&self, pos: u64) {
        match self {
            Progress::Bar(b) => b.set_position(pos),
            Progress::Lines(m) => {
                let mut l = Self::lines(m);
                l.pos = pos;
                l.start = (pos, Instant::now());
            }
            Progress::Hidden => {}
        }
    }

    /// A short status after the counts (the current loss, say).
    pub fn set_prefix(&self, prefix: String) {
        match self {
            Progress::Bar(b) => b.set_prefix(prefix),
            Progress::Lines(m) => Self::lines(m).prefix = prefix,
            Progress::Hidden => {}
        }
    }

    /// The phase is over: the bar is cleared, the plain report prints its last line.
    pub fn finish(&self) {
        match self {
            Progress::Bar(b) => b.finish_and_clear(),
            Progress::Lines(m) => eprintln!("{}", Self::lines(m).line()),
            Progress::Hidden => {}
        }
    }
}

/// A one-line note on stderr that a phase begins (none with `--quiet`).
pub fn phase(quiet: bool, text: &str) {
    if !quiet {
        eprintln!("soup: {text}");
    }
}

/// Peak resident set size of this process (VmHWM), in bytes; 0 where /proc is not available.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Bytes in the largest decimal unit that keeps the number ≥ 1 (kB, MB, GB).
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    match b {
        b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b} B"),
    }
}

/// Download progress bars on stderr (none with `--quiet`), drawn from the Hub fetcher's reports.
pub fn downloads(quiet: bool) -> Option<OnDownload> {
    if quiet {
        return None;
    }
    if !std::io::stderr().is_terminal() {
        // Plain lines: what starts and how it ended, with its size and time.
        let current: Mutex<Option<(String, Option<u64>, Instant)>> = Mutex::new(None);
        return Some(OnDownload(Arc::new(move |d: Download| {
            let mut current = current.lock().unwrap_or_else(|e| e.into_inner());
            match d {
                Download::Start { label, size } => {
                    eprintln!("soup: downloading {label}");
                    *current = Some((label.to_string(), size, Instant::now()));
                }
                Download::Size(s) => {
                    if let Some(c) = current.as_mut() {
                        c.1 = Some(s);
                    }
                }
                Download::End { complete } => {
                    if let Some((label, size, t)) = current.take() {
                        let size = size.map_or(String::new(), |s| format!(" ({})", human_bytes(s)));
                        let how = if complete {
                            "downloaded"
                        } else {
                            "stopped downloading"
                        };
                        eprintln!(
                            "soup: {how} {label}{size} in {}",
                            clock(t.elapsed().as_secs_f64())
                        );
                    }
                }
                Download::Position(_) | Download::Advance(_) => {}
            }
        })));
    }
    let bar: std::sync::Mutex<Option<ProgressBar>> = std::sync::Mutex::new(None);
    Some(OnDownload(Arc::new(move |d: Download| {
        let mut bar = bar.lock().unwrap_or_else(|e| e.into_inner());
        match d {
            Download::Start { label, size } => {
                let b = ProgressBar::new(size.unwrap_or(0));
                let style = ProgressStyle::with_template(
                    "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                b.set_style(style);
                b.set_message(label.to_string());
                *bar = Some(b);
            }
            Download::Size(s) => bar.iter().for_each(|b| b.set_length(s)),
            Download::Position(p) => bar.iter().for_each(|b| b.set_position(p)),
            Download::Advance(n) => bar.iter().for_each(|b| b.inc(n)),
            Download::End { complete } => {
                if let Some(b) = bar.take() {
                    if complete {
                        b.finish_and_clear();
                    } else {
                        b.abandon();
                    }
                }
            }
        }
    })))
}

/// A size in bytes as `flag` takes it: a number, with K, M or G for 10^3, 10^6 or 10^9; zero
/// only with `zero`.
pub fn parse_bytes(flag: &str, s: &str, zero: bool) -> Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1e3),
        Some('M' | 'm') => (&s[..s.len() - 1], 1e6),
        Some('G' | 'g') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    num.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| (v * mult) as u64)
        .filter(|&v| v > 0 || zero)
        .ok_or_else(|| CliError::new(format!("{flag} {s:?}: expected a size such as 8G")))
}
