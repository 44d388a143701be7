//! MEHL and MEHL+ in `soup mix`: a progress bar, and the run's state saved after every model
//! batch into `OUT.partial/progress.safetensors`, which `--resume` continues from.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use soup_core::{
    run_mehl, Collective, Event, MehlProgress, ModelStore, Objective, RunOptions, SoupResult,
    TensorSpec,
};
use soup_models::checkpoint::write_safetensors;
use soup_models::{Checkpoint, FileStore};

use super::soup::Counted;
use crate::common::Progress;
use crate::error::{CliError, Result};
use crate::output::PROGRESS;
use crate::recipe::Recipe;

/// The metadata key of `progress.safetensors` that holds [`SavedProgress`].
const META_PROGRESS: &str = "soup.progress";

/// The saved state of an interrupted run: the soup's block vectors are the tensors of
/// `OUT.partial/progress.safetensors`, this is in its metadata.
#[derive(Serialize, Deserialize)]
struct SavedProgress {
    recipe: Recipe,
    models: Vec<String>,
    /// The run's state but for the soup's block vectors (the file's tensors).
    progress: MehlProgress,
}

/// Where a MEHL run saves its progress, and what it resumes from.
pub(super) struct Saved<'a> {
    /// `OUT.partial/`.
    pub dir: &'a Path,
    pub recipe: &'a Recipe,
    pub names: &'a [String],
    /// The zoo's store when the run continues from the saved progress.
    pub resume: Option<&'a FileStore>,
}

/// MEHL or MEHL+ with a progress bar, saving progress after every model batch (rank 0);
/// returns the soup and the most models a model batch held on this rank.
pub(super) fn mix_mehl(
    store: &Counted,
    objective: &mut dyn Objective,
    saved: Saved,
    comm: &dyn Collective,
    quiet: bool,
) -> Result<(SoupResult, usize)> {
    let Saved {
        dir: partial,
        recipe,
        names,
        resume,
    } = saved;
    let (method, rank, n) = (recipe.method(), comm.rank(), store.len());
    let mut max_rows = 0;
    let config = recipe.mehl_config(&store.inner.arch.zero_gradient_tensors())?;
    let progress = match resume {
        Some(files) => Some(load_progress(partial, recipe, names, files)?),
        None => None,
    };
    let batches = config.outer_passes * n.div_ceil(config.model_batch.min(n));
    let steps_per_batch = config.inner_epochs * objective.num_batches();
    let bar = Progress::new(
        quiet,
        batches * steps_per_batch,
        &format!("{} steps", method.name()),
    );
    if let Some(p) = &progress {
        bar.set_position((p.model_batches_done * steps_per_batch) as u64);
    }
    let mut save_error = None;
    // Model batches whose state is in OUT.partial/, which a rerun with --resume continues from.
    let mut batches_saved = progress.as_ref().map_or(0, |p| p.model_batches_done);
    let result = run_mehl(
        store,
        objective,
        &config,
        RunOptions::new(&mut |e| match e {
            Event::Step { record, .. } => {
                bar.inc(1);
                bar.set_prefix(format!("loss {:.4}", record.loss));
            }
            Event::BatchEnd { progress, .. } => {
                if rank == 0 {
                    match save_progress(partial, recipe, names, progress) {
                        Ok(()) => batches_saved = progress.model_batches_done,
                        Err(e) => {
                            save_error.get_or_insert(e);
                        }
                    }
                }
            }
            Event::BatchStart { hyperplane, .. } => {
                max_rows = max_rows.max(hyperplane.batch_len());
            }
            Event::LearnedStep { .. } => {}
        })
        .resume(progress)
        .on(comm),
    );
    bar.finish();
    if let Some(e) = save_error {
        return Err(e);
    }
    match result {
        Ok(result) => Ok((result, max_rows)),
        // A member found bad (or any failure) after some model batches were saved: what
        // survives, and how to go on from it.
        Err(e) if rank == 0 && batches_saved > 0 => Err(CliError::new(format!(
            "{e}; {} keeps the {batches_saved} model batch(es) done: replace the bad model (or \
             remove the cause) and rerun the same command with --resume to continue from them",
            partial.display()
        ))),
        Err(e) => Err(e.into()),
    }
}

fn save_progress(dir: &Path, recipe: &Recipe, models: &[String], p: &MehlProgress) -> Result<()> {
    let saved = SavedProgress {
        recipe: recipe.clone(),
        models: models.to_vec(),
        progress: p.clone(),
    };
    let layout = soup_core::ParamLayout::new(
        p.soup_blocks
            .iter()
            .enumerate()
            .map(|(l, t)| TensorSpec {
                name: format!("block.{l}"),
                shape: t.dims().to_vec(),
            })
            .collect(),
    );
    // One file, written atomically: the soup's blocks with the rest of the state in its
    // metadata, so a crash leaves either the previous state or this one, never a mix.
    let meta = BTreeMap::from([(META_PROGRESS.to_string(), serde_json::to_string(&saved)?)]);
    write_safetensors(&dir.join(PROGRESS), &layout, &p.soup_blocks, &meta)?;
    Ok(())
}

fn load_progress(
    dir: &Path,
    recipe: &Recipe,
    models: &[String],
    store: &FileStore,
) -> Result<MehlProgress> {
    let path = dir.join(PROGRESS);
    let ckpt = Checkpoint::open(&path)?;
    let text = ckpt.metadata()?.remove(META_PROGRESS).ok_or_else(|| {
        CliError::new(format!(
            "{}: no saved run state in its metadata",
            path.display()
        ))
    })?;
    let saved: SavedProgress = serde_json::from_str(&text)
        .map_err(|e| CliError::new(format!("{}: {e}", path.display())))?;
    if &saved.recipe != recipe || saved.models != models {
        return Err(CliError::new(format!(
            "--resume: {} was saved by a run with another recipe or zoo",
            path.display()
        )));
    }
    let mut progress = saved.progress;
    progress.soup_blocks = (0..progress.alpha.len())
        .map(|l| ckpt.load(&format!("block.{l}"), &store.device))
        .collect::<std::result::Result<Vec<Tensor>, _>>()?;
    Ok(progress)
}
