//! What task arithmetic and TIES share between image classifiers (`merge`) and language models
//! (`soup`): the λ grid, and their merge as a [`SoupResult`].

use soup_core::{MergeMethod, ModelStore, SoupResult};

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
