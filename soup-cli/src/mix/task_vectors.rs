//! What task arithmetic and TIES share between image classifiers (`merge`) and language models
//! (`soup`): the λ grid and its choice, their merge as a [`SoupResult`], and AdaMerging's run.

use soup_core::{
    run_mehl, Event, MehlConfig, MergeMethod, MergedTaskVector, Metrics, ModelStore, Objective,
    RunOptions, SoupResult,
};

use crate::common::Progress;
use crate::error::Result;
use crate::recipe::Recipe;

/// The λ grid task arithmetic and TIES choose from on the held-out splits.
pub const LAMBDAS: [f64; 10] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// A [`SoupResult`] for a data-free merge θ_0 + λ τ: α_0 = 1 − K λ and α_k = λ for task
/// arithmetic; TIES's coordinates do not follow one α, so its α records λ alone (α_0 = 1 − λ,
/// the task models λ/K each, the weights of the merged task vector).
pub fn merged_result(
    kind: MergeMethod,
    recipe: &Recipe,
    store: &dyn ModelStore,
    soup: Vec<candle_core::Tensor>,
    lambda: f64,
) -> Result<SoupResult> {
    let k = store.len() - 1;
    let kf = k as f64;
    let ties = kind == MergeMethod::Ties;
    let row: Vec<f64> = (0..=k)
        .map(|j| match (j, ties) {
            (0, true) => 1.0 - lambda,
            (0, false) => 1.0 - kf * lambda,
            (_, true) => lambda / kf,
            (_, false) => lambda,
        })
        .collect();
    let layout = store.layout(0)?;
    let blocks = soup_core::BlockCut::WHOLE.blocks(&layout)?;
    let model = 4 * layout.numel();
    Ok(SoupResult {
        method: recipe.method().name().to_string(),
        model_names: (0..store.len()).map(|i| store.name(i)).collect(),
        soup,
        layout,
        blocks,
        alpha: vec![row],
        history: Vec::new(),
        evaluations: Vec::new(),
        timings: Default::default(),
        memory: soup_core::MemoryAccount {
            models: if ties { 11 * model } else { 4 * model },
            ..Default::default()
        },
    })
}

/// AdaMerging through MEHL over `store` (θ_0 first, then the k task models) on `objective`, with
/// a bar of its steps; returns the merge and the model batch.
pub fn adamerging(
    store: &dyn ModelStore,
    objective: &mut dyn Objective,
    config: &MehlConfig,
    (k, name, quiet): (usize, &str, bool),
) -> Result<(SoupResult, usize)> {
    let b = config.model_batch.min(k);
    let steps = config.outer_passes * k.div_ceil(b) * config.inner_epochs * objective.num_batches();
    let bar = Progress::new(quiet, steps, &format!("{name} steps"));
    let result = run_mehl(
        store,
        objective,
        config,
        RunOptions::new(&mut |e| {
            if let Event::Step { record, .. } = e {
                bar.inc(1);
                bar.set_prefix(format!("loss {:.4}", record.loss));
            }
        }),
    )?;
    bar.finish();
    Ok((result, b))
}

/// The task vector, the λ chosen and every (λ, recorded value) tried.
type Chosen = (MergedTaskVector, f64, Vec<(f64, f64)>);

/// A value of a merge's held-out metrics.
type Measure = fn(&Metrics) -> f64;

/// Task arithmetic's or TIES's task vector, and the first λ of [`LAMBDAS`] whose θ_0 + λ τ
/// scores best on `objective` (higher `score` is better), with every (λ, `recorded`) tried.
pub fn chosen_lambda(
    kind: MergeMethod,
    store: &dyn ModelStore,
    recipe: &Recipe,
    objective: &mut dyn Objective,
    (score, recorded): (Measure, Measure),
    quiet: bool,
) -> Result<Chosen> {
    let merged = if kind == MergeMethod::Ties {
        soup_core::ties_merging(store, 0, recipe.density.unwrap_or(0.2))?
    } else {
        soup_core::task_arithmetic(store, 0)?
    };
    let bar = Progress::new(quiet, LAMBDAS.len(), "λ tried on the held-out data");
    let mut grid = Vec::with_capacity(LAMBDAS.len());
    let mut best = (LAMBDAS[0], f64::NEG_INFINITY);
    for lambda in LAMBDAS {
        let m = objective.evaluate(&merged.at(lambda)?)?;
        grid.push((lambda, recorded(&m)));
        if score(&m) > best.1 {
            best = (lambda, score(&m));
        }
        bar.inc(1);
    }
    bar.finish();
    Ok((merged, best.0, grid))
}
