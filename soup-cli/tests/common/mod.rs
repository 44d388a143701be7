//! Shared by the command-line tests: running the `soup` binary and reading what it wrote.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs `soup args -q` in `dir` (the test's own directory when `None`) with `env` set, and with
/// none of the Hub and crash-point variables of the environment the tests run in.
pub fn run(dir: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_soup"));
    cmd.args(args).arg("-q");
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    for var in [
        "HF_ENDPOINT",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "SOUP_CACHE",
        "SOUP_CRASH_AT",
        "SOUP_CRASH_TRACE",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run soup")
}

/// Runs `soup args` and returns its stdout; fails the test unless it succeeded.
pub fn ok(args: &[&str]) -> String {
    let out = run(None, args, &[]);
    assert!(
        out.status.success(),
        "soup {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `soup args` and fails the test unless it exits with code 2 and a message containing
/// `what`, without a panic.
pub fn fails(args: &[&str], what: &str) {
    let out = run(None, args, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "soup {args:?}: {err}");
    assert!(
        err.contains(what),
        "soup {args:?}: expected {what:?} in {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// A JSON file, parsed.
pub fn json(path: impl AsRef<Path>) -> serde_json::Value {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
