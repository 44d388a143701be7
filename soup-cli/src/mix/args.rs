//! The arguments of `soup mix`, and what is read from them before any work: the recipe and the
//! memory limit.

use std::path::PathBuf;

use soup_core::Method;

use crate::common::{human_bytes, DataArgs};
use crate::error::{io, CliError, Result};
use crate::recipe::Recipe;

#[derive(clap::Args, Debug)]
pub struct MixArgs {
    /// The zoo: a directory of checkpoints or a zoo.toml. For the multi-task methods
    /// (adamerging, adamerging+, task-arithmetic, ties): the task models, each fine-tuned from
    /// `--base` on its own task, with `--data` listing their data sets in the same order.
    #[arg(long)]
    pub zoo: PathBuf,
    /// Multi-task methods: the pre-trained model θ_0 every task model was fine-tuned from.
    #[arg(long)]
    pub base: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Further evaluation sets for the soup (comma-separated, read as --data is, their test
    /// split), each scored by name in report.json and the card, with their mean accuracy.
    #[arg(long, value_delimiter = ',')]
    pub test: Vec<String>,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// A recipe.toml; flags override its values.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    #[command(flatten)]
    pub knobs: Recipe,
    /// Multi-task zoos: merge the task models' encoders with a data-free method from mergekit's
    /// YAML (as `soup merge` reads it; its models are the zoo's and its base_model `--base`)
    /// instead of `--method`; each task keeps its own head and is scored on its data.
    #[arg(long, conflicts_with = "method")]
    pub mergekit_config: Option<PathBuf>,
    /// Continue an interrupted MEHL run from OUT.partial/.
    #[arg(long)]
    pub resume: bool,
    /// Refuse to start when the estimated memory exceeds this many bytes (suffixes K, M, G).
    #[arg(long)]
    pub max_memory: Option<String>,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// Check everything, measure a model load, a gradient step and an evaluation batch, print
    /// the memory and time estimates, and stop: nothing is written.
    #[arg(long)]
    pub dry_run: bool,
    /// Overrides the zoo.toml's [arch_config] key by key.
    #[command(flatten)]
    pub arch: crate::common::ArchOverride,
    #[command(flatten)]
    pub device: crate::common::DeviceArgs,
}

/// The recipe of the run: `--recipe`'s file, overridden by the flags, resolved.
pub(super) fn resolve_recipe(args: &MixArgs) -> Result<Recipe> {
    let from_file = match &args.recipe {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
            toml::from_str::<Recipe>(&text)
                .map_err(|e| CliError::new(format!("{}: {}", path.display(), e.message())))?
        }
        None => Recipe::default(),
    };
    from_file.overridden_by(&args.knobs).resolved()
}

/// Refuses a run whose `estimate` exceeds `--max-memory`.
pub(super) fn check_memory(
    args: &MixArgs,
    method: Method,
    estimate: u64,
    n: usize,
    d: usize,
) -> Result<()> {
    if let Some(limit) = &args.max_memory {
        let limit = crate::common::parse_bytes("--max-memory", limit, false)?;
        if estimate > limit {
            return Err(CliError::new(format!(
                "{} needs about {} for {n} models of {d} parameters plus the data, over --max-memory {}",
                method.name(),
                human_bytes(estimate),
                human_bytes(limit)
            )));
        }
    }
    Ok(())
}

/// Whether a multi-task merge's `--base` is a language model (without one, `merge` says that
/// it needs it).
pub(super) fn merges_language_models(args: &MixArgs) -> Result<bool> {
    let Some(base) = &args.base else {
        return Ok(false);
    };
    let arch = soup_models::Checkpoint::open(base)?.architecture_with(&args.arch.map()?)?;
    Ok(matches!(arch.input(), soup_models::InputSpec::Tokens(_)))
}
