//! `--test D1,D2,…`: further evaluation sets (distribution shifts, say) that `soup eval` and
//! `soup mix` score a classifier on, each by name, with their mean accuracy as model-soups
//! reports the shifts' average. Each is read as `--data` is (its test split), with the same
//! flags; a split of fewer classes than the head's is scored over its own classes.

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use soup_core::Objective;
use soup_models::data::Split;
use soup_models::{Architecture, Classification};

use crate::common::DataArgs;
use crate::error::{CliError, Result};
use crate::mix::Scores;

/// One evaluation set: its name (the folder's) and how it is read.
pub struct EvalSet {
    pub name: String,
    pub data: DataArgs,
}

/// One evaluation set's scores.
#[derive(Clone, serde::Serialize)]
pub struct SetScores {
    pub name: String,
    pub data: String,
    #[serde(flatten)]
    pub scores: Scores,
    /// The classes scored where the set holds fewer than the head's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classes_scored: Option<usize>,
}

/// The sets `--test` lists, each checked to be a data set before any work; two sets of one
/// name are told apart by their position.
pub fn eval_sets(list: &[String], data: &DataArgs) -> Result<Vec<EvalSet>> {
    let mut sets: Vec<EvalSet> = Vec::with_capacity(list.len());
    for d in list.iter().map(|d| d.trim()) {
        if d.is_empty() {
            return Err(CliError::new("--test lists an empty data set name"));
        }
        let set = DataArgs {
            data: d.to_string(),
            ..data.clone()
        };
        // The layout is checked now, not after an hour of souping.
        set.spec()
            .is_image_folder()
            .map_err(|e| CliError::new(format!("--test {d}: {e}")))?;
        let mut name = match soup_models::data::imagenet::Layout::parse(d) {
            Some((layout, _)) => layout.name().to_string(),
            None => Path::new(d)
                .file_name()
                .map_or(d.to_string(), |f| f.to_string_lossy().into_owned()),
        };
        if sets.iter().any(|s| s.name == name) {
            name = format!("{name} ({})", sets.len() + 1);
        }
        sets.push(EvalSet { name, data: set });
    }
    Ok(sets)
}

/// `params` of `arch` scored on every set's test split.
pub fn score(
    sets: &[EvalSet],
    arch: &Arc<dyn Architecture>,
    params: &[Tensor],
) -> Result<Vec<SetScores>> {
    sets.iter()
        .map(|set| {
            let data = set.data.load(Split::Test, arch)?;
            let classes_scored = data.classes.as_ref().map(Vec::len);
            let mut objective = Classification::new(arch.clone(), data, 256);
            Ok(SetScores {
                name: set.name.clone(),
                data: set.data.data.clone(),
                scores: objective.evaluate(params)?.into(),
                classes_scored,
            })
        })
        .collect()
}

/// The mean accuracy over the sets (NaN for none).
pub fn mean_accuracy(scores: &[SetScores]) -> f64 {
    scores.iter().map(|s| s.scores.accuracy).sum::<f64>() / scores.len() as f64
}

/// The sets' scores as a markdown table, their mean accuracy last.
pub fn table(scores: &[SetScores]) -> String {
    let mut rows: Vec<Vec<String>> = scores
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                format!("{:.4}", s.scores.accuracy),
                format!("{:.4}", s.scores.loss),
                s.scores.count.to_string(),
                s.classes_scored.map_or("all".into(), |k| k.to_string()),
            ]
        })
        .collect();
    rows.push(vec![
        "mean".into(),
        format!("{:.4}", mean_accuracy(scores)),
        String::new(),
        String::new(),
        String::new(),
    ]);
    crate::card::table(
        &[
            "evaluation set",
            "accuracy",
            "loss",
            "examples",
            "classes scored",
        ],
        &rows,
    )
}
