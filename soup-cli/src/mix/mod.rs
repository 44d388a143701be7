//! `soup mix`: a soup of a zoo ([`soup`]: uniform, greedy, learned, MEHL), or a merge of task
//! models fine-tuned from one base ([`merge`]: AdaMerging, task arithmetic, TIES), chosen by the
//! method's [`Kind`] from soup-core's registry, or by a mergekit configuration's data-free
//! method (`--mergekit-config`, task models only: [`merge`]). A merge of language models is one model, as a
//! soup is: [`soup`] makes it.
//!
//! Outputs go to `OUT.partial/` while the run lasts (MEHL saves its progress there after every
//! model batch, which `--resume` continues from); the finished directory is renamed to OUT, so
//! OUT is never half-written. The modules depend on one another in one direction: this one on
//! `soup` and `merge`, those on `args` and `outputs` (and `soup` on `evaluation`, `mehl` and
//! `dry_run`).

mod args;
mod dry_run;
mod evaluation;
mod mehl;
mod merge;
mod outputs;
mod soup;
mod task_vectors;

use soup_core::{Collective, Kind};

use crate::error::Result;

pub use args::MixArgs;
pub use outputs::Scores;

/// `soup mix`: the recipe of `args`, then the method's run.
pub fn mix(args: &MixArgs, quiet: bool, comm: &dyn Collective) -> Result<()> {
    if let Some(config) = &args.mergekit_config {
        return merge::mix_config(args, config, quiet, comm);
    }
    let recipe = args::resolve_recipe(args)?;
    match recipe.method().kind() {
        Kind::Soup(kind) => soup::mix(args, recipe, Kind::Soup(kind), quiet, comm),
        // A language model has no task heads to keep apart: its merge is one model, as a soup is.
        Kind::Merge(kind) if args::merges_language_models(args)? => {
            soup::mix(args, recipe, Kind::Merge(kind), quiet, comm)
        }
        Kind::Merge(kind) => merge::mix(args, recipe, kind, quiet, comm),
    }
}
