//! The data-free merges (spec §3.10) against naive references written from their definitions,
//! the statistics of the random masks (DARE, DELLA), the mask-given arithmetic, and the
//! streaming contract: one tensor of every model at a time. mergekit's own outputs are checked
//! in soup-cli's `mergekit` test.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use soup_core::{
    data_free_merge, merge_tensor, DataFreeMethod, KeepProbability, MaskSource, ModelStore,
    ParamLayout, SeededMasks, TensorParams, TensorSpec,
};

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Values of `n` entries, seeded, on the scale of a weight.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = soup_core::rng::SplitMix64::new(seed);
    rng.normals(n)
        .into_iter()
        .map(|v| (v * 0.1) as f32)
        .collect()
}

/// Input `k` of a zoo: a shared base plus a perturbation of its own.
fn zoo(inputs: usize, n: usize, seed: u64) -> Vec<Vec<f32>> {
    let base = values(n, seed);
    (0..inputs)
        .map(|k| {
            if k == 0 {
                return base.clone();
            }
            let d = values(n, seed + 1 + k as u64);
            base.iter().zip(&d).map(|(b, v)| b + 0.2 * v).collect()
        })
        .collect()
}

fn params(method: DataFreeMethod, inputs: usize, set: &[(usize, &str, f64)]) -> TensorParams {
    let mut p = TensorParams::defaults(method, inputs);
    for &(i, name, v) in set {
        if i == usize::MAX {
            p.set_shared(name, v);
        } else {
            p.set_input(i, name, v);
        }
    }
    p
}

const SHARED: usize = usize::MAX;

fn merge(
    method: DataFreeMethod,
    shape: &[usize],
    x: &[Vec<f32>],
    base: Option<usize>,
    p: &TensorParams,
    masks: &mut dyn MaskSource,
) -> soup_core::Result<Vec<f32>> {
    let views: Vec<&[f32]> = x.iter().map(Vec::as_slice).collect();
    merge_tensor(method, (0, "w", shape), &views, base, p, masks)
}

fn close(a: &[f32], b: &[f64], tol: f64) {
    let scale = b.iter().map(|v| v.abs()).fold(1e-12, f64::max);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (f64::from(*x) - y).abs() <= tol * scale,
            "entry {i}: {x} against {y}"
        );
    }
}

/// TIES per tensor from its definition, in f64: each δ_k keeps its k = max(1, ⌊d n⌋) largest
/// entries, is weighted, the sign of the weighted sum is elected, and the agreeing weighted
/// entries are summed and divided by their weights (normalize).
fn naive_ties(x: &[Vec<f32>], weights: &[f64], densities: &[f64], lambda: f64) -> Vec<f64> {
    let n = x[0].len();
    let base: Vec<f64> = x[0].iter().map(|v| f64::from(*v)).collect();
    let deltas: Vec<Vec<f64>> = (1..x.len())
        .map(|k| {
            let d: Vec<f64> = x[k]
                .iter()
                .zip(&base)
                .map(|(v, b)| f64::from(*v) - b)
                .collect();
            let keep = ((densities[k - 1] * n as f64) as usize).max(1);
            let mut mags: Vec<f64> = d.iter().map(|v| v.abs()).collect();
            mags.sort_by(|a, b| b.total_cmp(a));
            let threshold = mags[keep - 1];
            d.iter()
                .map(|v| {
                    if v.abs() >= threshold {
                        v * weights[k - 1]
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    (0..n)
        .map(|e| {
            let elected: f64 = deltas.iter().map(|d| d[e]).sum();
            let positive = elected >= 0.0;
            let (mut sum, mut div) = (0.0, 0.0);
            for (d, w) in deltas.iter().zip(weights) {
                if (positive && d[e] > 0.0) || (!positive && d[e] < 0.0) {
                    sum += d[e];
                    div += w;
                }
            }
            base[e] + lambda * sum / if div == 0.0 { 1.0 } else { div }
        })
        .collect()
}

proptest! {
    #![proptest_config(cases(40))]

    /// Task arithmetic is θ_0 + λ Σ w_k (θ_k − θ_0).
    #[test]
    fn task_arithmetic_is_the_weighted_sum_of_task_vectors(
        seed in 0u64..1000, k in 1usize..5, n in 1usize..300, lambda in 0.1f64..2.0,
    ) {
        let x = zoo(k + 1, n, seed);
        let weights: Vec<f64> = (0..k).map(|i| 0.2 + 0.3 * i as f64).collect();
        let mut set: Vec<(usize, &str, f64)> = weights.iter().enumerate().map(|(i, w)| (i + 1, "weight", *w)).collect();
        set.push((SHARED, "lambda", lambda));
        let p = params(DataFreeMethod::TaskArithmetic, k + 1, &set);
        let got = merge(DataFreeMethod::TaskArithmetic, &[n], &x, Some(0), &p, &mut SeededMasks { seed: 0 }).unwrap();
        let want: Vec<f64> = (0..n).map(|e| {
            let b = f64::from(x[0][e]);
            b + lambda * (1..=k).map(|j| weights[j - 1] * (f64::from(x[j][e]) - b)).sum::<f64>()
        }).collect();
        close(&got, &want, 1e-5);
    }

    /// TIES per tensor against the naive reference.
    #[test]
    fn ties_per_tensor_is_trim_elect_and_disjoint_mean(
        seed in 0u64..1000, k in 1usize..5, n in 1usize..300, density in 0.05f64..1.0,
    ) {
        let x = zoo(k + 1, n, seed);
        let weights: Vec<f64> = (0..k).map(|i| 1.0 - 0.15 * i as f64).collect();
        let densities: Vec<f64> = (0..k).map(|i| (density * (1.0 - 0.1 * i as f64)).max(0.01)).collect();
        let mut set = Vec::new();
        for i in 0..k {
            set.push((i + 1, "weight", weights[i]));
            set.push((i + 1, "density", densities[i]));
        }
        let p = params(DataFreeMethod::Ties, k + 1, &set);
        let got = merge(DataFreeMethod::Ties, &[n], &x, Some(0), &p, &mut SeededMasks { seed: 0 }).unwrap();
        close(&got, &naive_ties(&x, &weights, &densities, 1.0), 1e-5);
    }

    /// Linear is Σ w_i θ_i / Σ w_i, and the base is one more input.
    #[test]
    fn linear_is_the_normalised_weighted_mean(seed in 0u64..1000, k in 1usize..5, n in 1usize..200) {
        let x = zoo(k, n, seed);
        let set: Vec<(usize, &str, f64)> = (0..k).map(|i| (i, "weight", 0.5 + i as f64)).collect();
        let p = params(DataFreeMethod::Linear, k, &set);
        let got = merge(DataFreeMethod::Linear, &[n], &x, None, &p, &mut SeededMasks { seed: 0 }).unwrap();
        let total: f64 = (0..k).map(|i| 0.5 + i as f64).sum();
        let want: Vec<f64> = (0..n).map(|e| (0..k).map(|i| (0.5 + i as f64) * f64::from(x[i][e])).sum::<f64>() / total).collect();
        close(&got, &want, 1e-5);
    }
}

/// A mask source that records what it was asked and answers with a given mask.
struct Given {
    mask: Vec<bool>,
    asked: RefCell<Vec<Vec<f64>>>,
}

impl MaskSource for Given {
    fn mask(
        &mut self,
        _tensor: usize,
        _input: usize,
        n: usize,
        keep: KeepProbability<'_>,
    ) -> soup_core::Result<Vec<bool>> {
        let probs = match keep {
            KeepProbability::Uniform(p) => vec![p; n],
            KeepProbability::PerEntry(p) => p.to_vec(),
        };
        self.asked.borrow_mut().push(probs);
        Ok(self.mask.clone())
    }
}

#[test]
fn dare_with_a_given_mask_is_the_masked_task_vector_rescaled_to_its_l1_norm() {
    let n = 64;
    let x = zoo(2, n, 7);
    let mask: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
    let mut given = Given {
        mask: mask.clone(),
        asked: RefCell::new(Vec::new()),
    };
    let p = params(
        DataFreeMethod::DareLinear,
        2,
        &[(1, "weight", 0.8), (1, "density", 0.6)],
    );
    let got = merge(
        DataFreeMethod::DareLinear,
        &[n],
        &x,
        Some(0),
        &p,
        &mut given,
    )
    .unwrap();
    assert_eq!(given.asked.borrow().as_slice(), &[vec![0.6; n]]);
    let delta: Vec<f64> = (0..n)
        .map(|e| f64::from(x[1][e]) - f64::from(x[0][e]))
        .collect();
    let l1: f64 = delta.iter().map(|v| v.abs()).sum();
    let kept: f64 = delta
        .iter()
        .zip(&mask)
        .filter(|(_, m)| **m)
        .map(|(v, _)| v.abs())
        .sum();
    let want: Vec<f64> = (0..n)
        .map(|e| {
            f64::from(x[0][e])
                + if mask[e] {
                    0.8 * delta[e] * l1 / kept
                } else {
                    0.0
                }
        })
        .collect();
    close(&got, &want, 1e-5);
    // Without rescale, the dropped entries are the base's and the kept ones unscaled.
    let mut p = p;
    p.set_shared("rescale", 0.0);
    let got = merge(
        DataFreeMethod::DareLinear,
        &[n],
        &x,
        Some(0),
        &p,
        &mut given,
    )
    .unwrap();
    let want: Vec<f64> = (0..n)
        .map(|e| f64::from(x[0][e]) + if mask[e] { 0.8 * delta[e] } else { 0.0 })
        .collect();
    close(&got, &want, 1e-5);
}

#[test]
fn seeded_dare_keeps_about_density_of_the_entries_and_the_seed_decides_which() {
    let n = 20_000;
    let x = zoo(2, n, 3);
    let p = params(
        DataFreeMethod::DareLinear,
        2,
        &[
            (1, "weight", 1.0),
            (1, "density", 0.3),
            (SHARED, "rescale", 0.0),
        ],
    );
    let run = |seed| {
        merge(
            DataFreeMethod::DareLinear,
            &[n],
            &x,
            Some(0),
            &p,
            &mut SeededMasks { seed },
        )
        .unwrap()
    };
    let a = run(1);
    let kept = a.iter().zip(&x[0]).filter(|(m, b)| m != b).count() as f64 / n as f64;
    let se = (0.3f64 * 0.7 / n as f64).sqrt();
    assert!((kept - 0.3).abs() < 5.0 * se, "kept {kept}");
    assert_eq!(a, run(1));
    assert_ne!(a, run(2));
}

#[test]
fn della_keep_probabilities_rise_with_magnitude_along_each_row_around_density() {
    let (rows, cols) = (4, 9);
    let x = zoo(2, rows * cols, 11);
    let mut given = Given {
        mask: vec![true; rows * cols],
        asked: RefCell::new(Vec::new()),
    };
    let p = params(
        DataFreeMethod::DellaLinear,
        2,
        &[(1, "weight", 1.0), (1, "density", 0.5), (1, "epsilon", 0.2)],
    );
    merge(
        DataFreeMethod::DellaLinear,
        &[rows, cols],
        &x,
        Some(0),
        &p,
        &mut given,
    )
    .unwrap();
    let probs = given.asked.borrow()[0].clone();
    for r in 0..rows {
        let row = r * cols..(r + 1) * cols;
        let delta: Vec<f64> = row
            .clone()
            .map(|e| (f64::from(x[1][e]) - f64::from(x[0][e])).abs())
            .collect();
        let mut order: Vec<usize> = (0..cols).collect();
        order.sort_by(|&a, &b| delta[a].total_cmp(&delta[b]));
        for (rank, &c) in order.iter().enumerate() {
            let want = 0.3 + 0.4 * rank as f64 / (cols - 1) as f64;
            assert!(
                (probs[r * cols + c] - want).abs() < 1e-12,
                "row {r} col {c}"
            );
        }
        let mean: f64 = probs[row].iter().sum::<f64>() / cols as f64;
        assert!((mean - 0.5).abs() < 1e-12);
    }
}

#[test]
fn model_stock_moves_to_the_mean_when_task_vectors_agree_and_stays_when_they_are_orthogonal() {
    let base = vec![1.0f32, 2.0, 3.0, 4.0];
    let same = vec![
        base.clone(),
        vec![1.5, 2.5, 3.5, 4.5],
        vec![2.0, 3.0, 4.0, 5.0],
    ];
    let p = TensorParams::defaults(DataFreeMethod::ModelStock, 3);
    let got = merge(
        DataFreeMethod::ModelStock,
        &[4],
        &same,
        Some(0),
        &p,
        &mut SeededMasks { seed: 0 },
    )
    .unwrap();
    close(&got, &[1.75, 2.75, 3.75, 4.75], 1e-6);
    let orthogonal = vec![
        base.clone(),
        vec![2.0, 2.0, 3.0, 4.0],
        vec![1.0, 3.0, 3.0, 4.0],
    ];
    let got = merge(
        DataFreeMethod::ModelStock,
        &[4],
        &orthogonal,
        Some(0),
        &p,
        &mut SeededMasks { seed: 0 },
    )
    .unwrap();
    close(&got, &[1.0, 2.0, 3.0, 4.0], 1e-6);
}

#[test]
fn slerp_ends_at_its_inputs_and_keeps_the_norm_of_equal_norm_inputs() {
    let x = vec![vec![1.0f32, 0.0], vec![0.0f32, 1.0]];
    for (t, want) in [
        (0.0, [1.0, 0.0]),
        (1.0, [0.0, 1.0]),
        (0.5, [0.5f64.sqrt(), 0.5f64.sqrt()]),
    ] {
        let p = params(DataFreeMethod::Slerp, 2, &[(SHARED, "t", t)]);
        let got = merge(
            DataFreeMethod::Slerp,
            &[2],
            &x,
            Some(0),
            &p,
            &mut SeededMasks { seed: 0 },
        )
        .unwrap();
        close(&got, &want, 1e-6);
    }
}

#[test]
fn out_of_range_settings_and_wrong_input_counts_are_refused() {
    let x = zoo(3, 8, 1);
    let masks = &mut SeededMasks { seed: 0 };
    for (method, set, says) in [
        (
            DataFreeMethod::Ties,
            vec![(1, "weight", 1.0), (2, "weight", 1.0), (1, "density", 0.0)],
            "outside (0, 1]",
        ),
        (
            DataFreeMethod::Ties,
            vec![(1, "weight", 1.0), (2, "weight", 1.0), (2, "density", 1.5)],
            "outside (0, 1]",
        ),
        (
            DataFreeMethod::Breadcrumbs,
            vec![(1, "weight", 1.0), (2, "weight", 1.0), (1, "gamma", 1.0)],
            "gamma",
        ),
        (
            DataFreeMethod::Della,
            vec![
                (1, "weight", 1.0),
                (2, "weight", 1.0),
                (1, "density", 0.1),
                (1, "epsilon", 0.2),
            ],
            "epsilon",
        ),
        (
            DataFreeMethod::TaskArithmetic,
            vec![
                (1, "weight", 1.0),
                (2, "weight", -1.0),
                (SHARED, "normalize", 1.0),
            ],
            "sum to zero",
        ),
        (DataFreeMethod::Slerp, vec![(SHARED, "t", 0.5)], "exactly 1"),
    ] {
        let p = params(method, 3, &set);
        let e = merge(method, &[8], &x, Some(0), &p, masks)
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{}: {e}", method.name());
    }
    let p = params(
        DataFreeMethod::Linear,
        3,
        &[(0, "weight", 1.0), (1, "weight", 1.0), (2, "weight", -2.0)],
    );
    let e = merge(DataFreeMethod::Linear, &[8], &x, None, &p, masks)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sum to zero"), "{e}");
}

/// A store that serves whole models only through `load`, and counts both kinds of read.
struct Counting {
    layout: ParamLayout,
    models: Vec<Vec<Tensor>>,
    whole: RefCell<usize>,
    tensors: RefCell<usize>,
}

impl ModelStore for Counting {
    fn len(&self) -> usize {
        self.models.len()
    }
    fn name(&self, i: usize) -> String {
        format!("model-{i}")
    }
    fn layout(&self, _: usize) -> soup_core::Result<ParamLayout> {
        Ok(self.layout.clone())
    }
    fn load(&self, i: usize) -> soup_core::Result<Vec<Tensor>> {
        *self.whole.borrow_mut() += 1;
        Ok(self.models[i].clone())
    }
    fn load_tensor(&self, i: usize, t: usize) -> soup_core::Result<Tensor> {
        *self.tensors.borrow_mut() += 1;
        Ok(self.models[i][t].clone())
    }
}

#[test]
fn a_merge_reads_one_tensor_of_every_model_at_a_time_and_never_a_whole_model() {
    let shapes = [vec![3, 4], vec![4], vec![2, 2, 2]];
    let layout = ParamLayout::new(
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| TensorSpec {
                name: format!("t{i}"),
                shape: s.clone(),
            })
            .collect(),
    );
    let models: Vec<Vec<Tensor>> = (0..4)
        .map(|m| {
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let n: usize = s.iter().product();
                    soup_core::transfer::upload_vec(
                        values(n, 100 * m + i as u64),
                        s.as_slice(),
                        &Device::Cpu,
                    )
                    .unwrap()
                })
                .collect()
        })
        .collect();
    let store = Counting {
        layout,
        models,
        whole: RefCell::new(0),
        tensors: RefCell::new(0),
    };
    let merged = data_free_merge(
        &store,
        DataFreeMethod::Ties,
        Some(3),
        &mut |_, _| {
            Ok(params(
                DataFreeMethod::Ties,
                4,
                &[
                    (0, "weight", 1.0),
                    (1, "weight", 0.5),
                    (2, "weight", 0.7),
                    (0, "density", 0.5),
                ],
            ))
        },
        &mut SeededMasks { seed: 0 },
    )
    .unwrap();
    assert_eq!(*store.whole.borrow(), 0);
    assert_eq!(*store.tensors.borrow(), 4 * 3);
    for (m, s) in merged.iter().zip(&shapes) {
        assert_eq!(m.dims(), s.as_slice());
        assert_eq!(m.dtype(), DType::F32);
    }
}
