//! `cargo xtask`: the project's build system, in Rust.
//!
//! - `cargo xtask ci`: everything CI checks: formatting, clippy with warnings denied, every test.
//! - `cargo xtask reproduce`, `cargo xtask bench`: the paper's experiments and the benchmarks
//!   (their issues, [reproduce] and [perf], fill them in).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("reproduce") | Some("bench") => Err(format!(
            "`cargo xtask {}` is not implemented yet: it arrives with its issue",
            args[0]
        )),
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
  ci         formatting, clippy (warnings denied) and every test of the workspace
  reproduce  the paper's experiments (not implemented yet)
  bench      the benchmarks (not implemented yet)";

/// The workspace root (the parent of this crate's directory).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs `cargo args...` in the workspace root; the error names the failing command.
fn cargo(args: &[&str]) -> Result<(), String> {
    let shown = format!("cargo {}", args.join(" "));
    eprintln!("xtask: $ {shown}");
    let started = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(cargo)
        .args(args)
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
    eprintln!(
        "xtask: `{shown}` finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if status.success() {
        Ok(())
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

fn ci() -> Result<(), String> {
    let started = Instant::now();
    ensure_components()?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["test", "--workspace"])?;
    eprintln!(
        "xtask: ci passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
