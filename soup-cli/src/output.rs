//! Output directories: made whole or not at all, and replaced only when soup wrote them.
//!
//! A command writes into `OUT.partial/` while it runs. When every output file is in place it
//! writes the marker [`MARKER`] (the list of files it wrote), which makes the directory
//! *finished*; then it drops its saved progress and renames the directory to OUT. So:
//! - OUT exists only complete;
//! - a crash before the marker leaves `OUT.partial/` with the progress saved so far, which
//!   `--resume` continues (or with no progress, which the next run clears);
//! - a crash after the marker leaves a finished `OUT.partial/`, which `--resume` moves into place.
//!
//! `--force` replaces OUT only when OUT holds soup's marker and nothing but the files the marker
//! lists, and when OUT is none of `/`, the home directory, the current directory or one of its
//! parents, and holds no input of the run. It removes exactly those files, then the directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use soup_models::checkpoint::{atomic_write, sync_dir};
use soup_models::crash;
use soup_models::ModelError;

use crate::error::{io, CliError, Result};

/// The marker of a directory soup wrote, listing its files.
pub const MARKER: &str = ".soup-output.json";

/// The saved progress of a run in `OUT.partial/` (one file: written atomically, read whole).
pub const PROGRESS: &str = "progress.safetensors";

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// The command that wrote the directory (`mix`).
    command: String,
    /// Every file it wrote there, the marker aside.
    files: Vec<String>,
}

/// `OUT.partial`, beside OUT.
pub fn partial_dir(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

/// The state of `OUT.partial/` when a run starts.
#[derive(Debug, PartialEq, Eq)]
pub enum Partial {
    /// No such directory.
    Absent,
    /// Left by a run that ended early with nothing saved.
    Empty,
    /// Holds the saved progress of an interrupted run.
    Progress,
    /// Holds a finished run not yet moved to OUT.
    Finished,
}

/// The plan of a run for OUT: checked before any work, so that a run that cannot write its
/// outputs fails before it starts.
pub struct Output {
    pub out: PathBuf,
    pub partial: PathBuf,
    pub state: Partial,
    /// The command that writes OUT, and the names of the files it writes there.
    command: &'static str,
    outputs: &'static [&'static str],
}

/// Whether `name` (a file directly in `OUT.partial/`) is one soup writes there: an output, the
/// progress, the marker, or a temporary file of an atomic write.
fn ours_in_partial(name: &str, outputs: &[&str]) -> bool {
    outputs.contains(&name) || name == PROGRESS || name == MARKER || is_temporary(name)
}

/// Whether `name` is the temporary file of an atomic write (`.NAME.tmp.PID`): a crash can leave
/// one behind, and it never holds state a run needs.
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp.")
}

/// Removes the temporary files a crashed writer left in `dir`.
pub fn remove_temporaries(dir: &Path) -> Result<()> {
    for name in entries(dir)? {
        if is_temporary(&name) {
            let path = dir.join(&name);
            std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
        }
    }
    Ok(())
}

/// The names of the entries of `dir` (files, links and directories alike).
fn entries(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let e = e.map_err(|e| io(dir, e))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// `path` made absolute and free of `.`/`..` and links where it exists.
fn absolute(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    // Not there (yet): its parent's canonical form, plus the name.
    let cwd = std::env::current_dir().unwrap_or_default();
    let joined = cwd.join(path);
    match (joined.parent(), joined.file_name()) {
        (Some(parent), Some(name)) => absolute(parent).join(name),
        _ => joined,
    }
}

/// Refuses to replace `out` when it is a directory no tool should delete wholesale.
fn check_replaceable_place(out: &Path, inputs: &[&Path]) -> Result<()> {
    let target = absolute(out);
    let refuse = |why: &str| {
        Err(CliError::new(format!(
            "{}: --force will not replace {why}",
            out.display()
        )))
    };
    if target.parent().is_none() {
        return refuse("the root directory");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        if absolute(Path::new(&home)) == target {
            return refuse("the home directory");
        }
    }
    let cwd = absolute(&std::env::current_dir().map_err(|e| io(Path::new("."), e))?);
    if cwd.starts_with(&target) {
        return refuse("the current directory or one of its parents");
    }
    for input in inputs {
        let input_abs = absolute(input);
        if input_abs.starts_with(&target) {
            return refuse(&format!(
                "a directory holding an input ({})",
                input.display()
            ));
        }
    }
    Ok(())
}

/// The files soup listed in `dir`'s marker, if `dir` holds nothing else; an error naming a
/// foreign entry otherwise.
fn owned_files(dir: &Path) -> Result<Vec<String>> {
    let marker_path = dir.join(MARKER);
    let marker: Marker = std::fs::read_to_string(&marker_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .ok_or_else(|| {
            CliError::new(format!(
                "{}: exists and was not written by soup (no {MARKER}); --force replaces only soup's own outputs",
                dir.display()
            ))
        })?;
    for name in entries(dir)? {
        if name != MARKER && !marker.files.contains(&name) {
            return Err(CliError::new(format!(
                "{}: holds {name}, which soup did not write; --force replaces only soup's own outputs",
                dir.display()
            )));
        }
    }
    Ok(marker.files)
}

/// Removes `files` and then the marker from `dir`, then `dir` itself (which must then be empty:
/// nothing else is ever deleted).
fn remove_owned(dir: &Path, files: &[String]) -> Result<()> {
    for f in files {
        let path = dir.join(f);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path, e)),
        }
    }
    let marker = dir.join(MARKER);
    if marker.exists() {
        std::fs::remove_file(&marker).map_err(|e| io(&marker, e))?;
    }
    std::fs::remove_dir(dir).map_err(|e| io(dir, e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent);
    }
    crash::point("output: old directory removed");
    Ok(())
}

/// The state of `partial`; an error when it holds anything soup does not write there.
fn partial_state(partial: &Path, outputs: &[&str]) -> Result<Partial> {
    if !partial.exists() {
        return Ok(Partial::Absent);
    }
    if !partial.is_dir() {
        return Err(CliError::new(format!(
            "{}: exists and is not a directory soup wrote; move it away",
            partial.display()
        )));
    }
    for name in entries(partial)? {
        if !ours_in_partial(&name, outputs) {
            return Err(CliError::new(format!(
                "{}: holds {name}, which soup did not write; move it away",
                partial.display()
            )));
        }
    }
    Ok(if partial.join(MARKER).exists() {
        Partial::Finished
    } else if partial.join(PROGRESS).exists() {
        Partial::Progress
    } else {
        Partial::Empty
    })
}

impl Output {
    /// Checks OUT and `OUT.partial/` before a run of `command` that writes `outputs` (file
    /// names) there.
    /// `inputs` are the run's input paths (zoo, data, recipe, ...), which OUT must not hold.
    pub fn check(
        out: &Path,
        command: &'static str,
        outputs: &'static [&'static str],
        inputs: &[&Path],
        force: bool,
        resume: bool,
    ) -> Result<Self> {
        if out.as_os_str().is_empty() || out.file_name().is_none() {
            return Err(CliError::new(format!(
                "--out {}: not a directory name soup can write (name a new directory)",
                out.display()
            )));
        }
        if out.exists() {
            if !out.is_dir() {
                return Err(CliError::new(format!(
                    "{}: exists and is not a directory",
                    out.display()
                )));
            }
            if !force {
                return Err(CliError::new(format!(
                    "{}: already exists (use --force to replace it)",
                    out.display()
                )));
            }
            check_replaceable_place(out, inputs)?;
            owned_files(out)?;
        }
        let partial = partial_dir(out);
        let state = partial_state(&partial, outputs)?;
        for input in inputs {
            if absolute(input).starts_with(absolute(&partial)) {
                return Err(CliError::new(format!(
                    "{}: an input of this run lies in {}",
                    input.display(),
                    partial.display()
                )));
            }
        }
        match (&state, resume, force) {
            (Partial::Absent, true, _) => {
                return Err(CliError::new(format!(
                    "--resume: no saved progress in {}",
                    partial.display()
                )))
            }
            (Partial::Progress, false, false) => {
                return Err(CliError::new(format!(
                    "{}: holds the progress of an interrupted run: --resume continues it, --force starts over",
                    partial.display()
                )))
            }
            (Partial::Finished, false, false) => {
                return Err(CliError::new(format!(
                    "{}: holds a finished run not yet moved to {}: --resume completes it",
                    partial.display(),
                    out.display()
                )))
            }
            _ => {}
        }
        Ok(Self {
            out: out.to_path_buf(),
            partial,
            state,
            command,
            outputs,
        })
    }

    /// Makes `OUT.partial/` ready for the run: kept as it is when resuming, emptied of soup's
    /// files otherwise.
    pub fn begin(&mut self, resume: bool) -> Result<()> {
        if self.state != Partial::Absent && !resume {
            for name in entries(&self.partial)? {
                if ours_in_partial(&name, self.outputs) {
                    let path = self.partial.join(&name);
                    std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
                }
            }
            self.state = Partial::Empty;
        }
        std::fs::create_dir_all(&self.partial).map_err(|e| io(&self.partial, e))?;
        remove_temporaries(&self.partial)
    }

    /// After a failed run: removes `OUT.partial/` unless it holds progress a `--resume` can use.
    pub fn abandon(&self) {
        if !self.partial.is_dir() || self.partial.join(PROGRESS).exists() {
            return;
        }
        if let Ok(names) = entries(&self.partial) {
            for name in names {
                if ours_in_partial(&name, self.outputs) {
                    let _ = std::fs::remove_file(self.partial.join(name));
                }
            }
        }
        let _ = std::fs::remove_dir(&self.partial);
    }

    /// Writes the marker into `OUT.partial/` (the run is finished), drops the progress, replaces
    /// OUT when `--force` allowed it, and renames `OUT.partial/` to OUT.
    pub fn finish(&self) -> Result<()> {
        remove_temporaries(&self.partial)?;
        if !self.partial.join(MARKER).exists() {
            let marker = Marker {
                command: self.command.to_string(),
                files: self.outputs.iter().map(|s| s.to_string()).collect(),
            };
            let text = serde_json::to_string_pretty(&marker)?;
            let path = self.partial.join(MARKER);
            atomic_write(&path, |tmp| {
                std::fs::write(tmp, &text).map_err(|e| ModelError::io(tmp, e))
            })?;
        }
        let progress = self.partial.join(PROGRESS);
        if progress.exists() {
            std::fs::remove_file(&progress).map_err(|e| io(&progress, e))?;
            sync_dir(&self.partial);
            crash::point("output: progress removed");
        }
        if self.out.exists() {
            let files = owned_files(&self.out)?;
            remove_owned(&self.out, &files)?;
        }
        std::fs::rename(&self.partial, &self.out).map_err(|e| io(&self.out, e))?;
        if let Some(parent) = self.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent);
        }
        crash::point("output: renamed into place");
        Ok(())
    }
}
