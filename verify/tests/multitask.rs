//! Multi-task merging (spec §3.9): AdaMerging through MEHL against a naive full-graph
//! AdaMerging, its invariants, and task arithmetic and TIES against naive references.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{config, objective, zoo, ARCH};
use proptest::prelude::*;
use soup_core::{
    epoch_seed, run_mehl, task_arithmetic, ties_merging, to_blocks, Batch, BlockCut, Event,
    MehlConfig, Objective, OptimizerKind, RunOptions, StepSchedule, TaskVectors,
};
use verify::{host_blocks, rel_err, soup_from_alpha, MemoryStore};

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every tensor of a model flattened, in f64.
fn flat(model: &[Tensor]) -> Vec<Vec<f64>> {
    model
        .iter()
        .map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
        .collect()
}

/// AdaMerging as its authors' code does it, written from the paper: every task vector resident,
/// λ (K × T, one per task and tensor, or K × 1 task-wise) a leaf, θ_t = θ_0,t + Σ_k clamp(λ) τ_k,t
/// built in the graph, SGD by hand; the clamp's gradient is the indicator of the closed range.
/// Block coordinate descent by hand: `batches` lists (outer pass, model batch, members) and only
/// the λ of the members (zoo indices) move in each, the others held at their clamped values; each
/// batch starts its members at their clamped λ with a fresh momentum buffer. One batch of every
/// task model is plain AdaMerging. Returns the loss of every step and the clamped λ after it.
fn full_graph_adamerging(
    store: &MemoryStore,
    base: usize,
    obj: &mut verify::MlpObjective,
    cfg: &MehlConfig,
    layer_wise: bool,
    batches: &[(usize, usize, Vec<usize>)],
) -> (Vec<f64>, Vec<Vec<Vec<f64>>>) {
    let tv = cfg.task_vectors.clone().unwrap();
    let dev = Device::Cpu;
    let theta_0 = flat(&store.models[base]);
    let tasks: Vec<usize> = (0..store.models.len()).filter(|&j| j != base).collect();
    let taus: Vec<Vec<Vec<f64>>> = tasks
        .iter()
        .map(|&j| {
            flat(&store.models[j])
                .iter()
                .zip(&theta_0)
                .map(|(m, b)| m.iter().zip(b).map(|(m, b)| m - b).collect())
                .collect()
        })
        .collect();
    let layout = ARCH.layout();
    let t_count = layout.len();
    let cols = if layer_wise { t_count } else { 1 };
    let k = tasks.len();
    let mut lambda = vec![vec![tv.prior; cols]; k];
    let OptimizerKind::Sgd { momentum } = cfg.optimizer else {
        panic!("the reference runs SGD")
    };
    let clamp = |v: f64| tv.clamp.map_or(v, |(lo, hi)| v.clamp(lo, hi));
    let inside = |v: f64| tv.clamp.is_none_or(|(lo, hi)| (lo..=hi).contains(&v));
    let (mut losses, mut lambdas) = (Vec::new(), Vec::new());
    for (outer_pass, model_batch, members) in batches {
        let moving: Vec<bool> = tasks.iter().map(|j| members.contains(j)).collect();
        for row in &mut lambda {
            for v in row.iter_mut() {
                *v = clamp(*v);
            }
        }
        let mut buf = vec![vec![0.0; cols]; k];
        let mut step = 0;
        for epoch in 0..cfg.inner_epochs {
            for index in 0..obj.num_batches() {
                let eff: Vec<Vec<f64>> = lambda
                    .iter()
                    .map(|row| row.iter().map(|&v| clamp(v)).collect())
                    .collect();
                let var = Var::from_vec(eff.concat(), (k, cols), &dev).unwrap();
                let theta: Vec<Tensor> = (0..t_count)
                    .map(|t| {
                        let mut th =
                            Tensor::from_vec(theta_0[t].clone(), theta_0[t].len(), &dev).unwrap();
                        for (i, tau) in taus.iter().enumerate() {
                            let lam = var
                                .as_tensor()
                                .narrow(0, i, 1)
                                .unwrap()
                                .narrow(1, if layer_wise { t } else { 0 }, 1)
                                .unwrap()
                                .reshape(1)
                                .unwrap();
                            let tau_t =
                                Tensor::from_vec(tau[t].clone(), tau[t].len(), &dev).unwrap();
                            th = (th + tau_t.broadcast_mul(&lam).unwrap()).unwrap();
                        }
                        th.reshape(layout.tensors[t].shape.as_slice()).unwrap()
                    })
                    .collect();
                let batch = Batch {
                    epoch_seed: epoch_seed(cfg.seed, *outer_pass, *model_batch, epoch),
                    index,
                };
                let loss = obj.loss(&theta, None, batch).unwrap();
                losses.push(loss.to_scalar::<f64>().unwrap());
                let g = loss
                    .backward()
                    .unwrap()
                    .get(var.as_tensor())
                    .unwrap()
                    .to_vec2::<f64>()
                    .unwrap();
                for i in (0..k).filter(|&i| moving[i]) {
                    for c in 0..cols {
                        let d = if inside(lambda[i][c]) { g[i][c] } else { 0.0 };
                        buf[i][c] = if step == 0 {
                            d
                        } else {
                            momentum * buf[i][c] + d
                        };
                        lambda[i][c] -= cfg.lr * buf[i][c];
                    }
                }
                lambdas.push(
                    lambda
                        .iter()
                        .map(|row| row.iter().map(|&v| clamp(v)).collect())
                        .collect(),
                );
                step += 1;
            }
        }
    }
    (losses, lambdas)
}

/// The run's loss and λ at every step against the reference's, within 1e-9.
fn same_trajectory(
    result: &soup_core::SoupResult,
    lambdas: &[Vec<Vec<f64>>],
    ref_losses: &[f64],
    ref_lambdas: &[Vec<Vec<f64>>],
) -> Result<(), TestCaseError> {
    let losses: Vec<f64> = result.history.iter().map(|r| r.loss).collect();
    prop_assert_eq!(losses.len(), ref_losses.len());
    for (s, (a, r)) in losses.iter().zip(ref_losses).enumerate() {
        prop_assert!(
            (a - r).abs() <= 1e-9 * r.abs().max(1.0),
            "loss at step {}: {} vs {}",
            s,
            a,
            r
        );
    }
    prop_assert_eq!(lambdas.len(), ref_lambdas.len());
    for (s, (a, r)) in lambdas.iter().zip(ref_lambdas).enumerate() {
        prop_assert!(
            rel_err(&a.concat(), &r.concat()) <= 1e-9,
            "λ at step {}: {:?} vs {:?}",
            s,
            a,
            r
        );
    }
    Ok(())
}

/// AdaMerging's run on the test zoo: SGD, a constant rate, `b` task models per batch.
fn adamerging_config(
    b: usize,
    base: usize,
    layer_wise: bool,
    tv: TaskVectors,
    momentum: f64,
    seed: u64,
) -> MehlConfig {
    MehlConfig {
        optimizer: OptimizerKind::Sgd { momentum },
        schedule: StepSchedule::Constant,
        clip_grad_norm: None,
        weight_decay: 0.0,
        lr: 0.5,
        task_vectors: Some(TaskVectors { base, ..tv }),
        ..config(
            b,
            if layer_wise {
                BlockCut::PER_TENSOR
            } else {
                BlockCut::WHOLE
            },
            1,
            seed,
        )
    }
}

// §3.9: with b = K (every task model in one batch), one pass and SGD, AdaMerging through MEHL is
// the full-graph AdaMerging, step for step: losses and λ within 1e-9 in f64.
proptest! {
    #![proptest_config(cases(48))]
    #[test]
    fn adamerging_through_mehl_with_b_equal_k_is_the_full_graph_adamerging(
        k in 1usize..5, base_pick in 0usize..5, layer_wise in any::<bool>(),
        clamped in any::<bool>(), prior in prop_oneof![Just(0.3), Just(0.95)],
        momentum in prop_oneof![Just(0.0), Just(0.9)], seed in any::<u64>(),
    ) {
        let n = k + 1;
        let base = base_pick % n;
        let store = zoo(n, seed, DType::F64);
        let mut obj = objective(24, 8, seed, DType::F64);
        let tv = TaskVectors { base, prior, clamp: clamped.then_some((0.0, 1.0)) };
        let cfg = adamerging_config(k, base, layer_wise, tv, momentum, seed);
        let mut lambdas: Vec<Vec<Vec<f64>>> = Vec::new();
        let result = run_mehl(&store, &mut obj, &cfg, RunOptions::new(&mut |e| {
            if let Event::Step { hyperplane, .. } = e {
                let alpha = hyperplane.alpha();
                // α[l][j] is task j's λ in block l.
                lambdas.push((0..n).filter(|&j| j != base)
                    .map(|j| alpha.iter().map(|row| row[j]).collect()).collect());
                for row in &alpha {
                    assert!((row.iter().sum::<f64>() - 1.0).abs() <= 1e-12);
                }
            }
        })).unwrap();
        prop_assert_eq!(&result.method, if layer_wise { "adamerging+" } else { "adamerging" });
        let every: Vec<usize> = (0..n).filter(|&j| j != base).collect();
        let (ref_losses, ref_lambdas) =
            full_graph_adamerging(&store, base, &mut obj, &cfg, layer_wise, &[(0, 0, every)]);
        same_trajectory(&result, &lambdas, &ref_losses, &ref_lambdas)?;
        // The soup is θ_0 + Σ λ τ of the final λ, and α reconstructs it.
        let naive = soup_from_alpha(&store, &result.blocks, &result.alpha).unwrap();
        let got = host_blocks(&to_blocks(&result.soup, &result.blocks).unwrap()).unwrap();
        prop_assert!(rel_err(&got.concat(), &naive.concat()) <= 1e-12);
        if clamped {
            for row in &result.alpha {
                for (j, a) in row.iter().enumerate() {
                    if j != base {
                        prop_assert!((0.0..=1.0).contains(a), "λ {} outside [0, 1]", a);
                    }
                }
            }
        }
    }
}

// §3.9 with b < K: AdaMerging through MEHL is block coordinate descent on λ, step for step:
// each model batch moves the λ of its members only, the others held where earlier batches left
// them; losses and λ within 1e-9 of the full-graph reference that moves only those λ.
proptest! {
    #![proptest_config(cases(32))]
    #[test]
    fn adamerging_in_model_batches_is_block_coordinate_descent_on_lambda(
        k in 2usize..6, b_pick in 1usize..5, passes in 1usize..3, base_pick in 0usize..6,
        layer_wise in any::<bool>(), clamped in any::<bool>(),
        momentum in prop_oneof![Just(0.0), Just(0.9)], seed in any::<u64>(),
    ) {
        let n = k + 1;
        let (base, b) = (base_pick % n, 1 + (b_pick - 1) % (k - 1));
        let store = zoo(n, seed, DType::F64);
        let mut obj = objective(16, 8, seed, DType::F64);
        let tv = TaskVectors { base, prior: 0.3, clamp: clamped.then_some((0.0, 1.0)) };
        let cfg = MehlConfig {
            outer_passes: passes,
            ..adamerging_config(b, base, layer_wise, tv, momentum, seed)
        };
        let mut batches = Vec::new();
        let mut lambdas: Vec<Vec<Vec<f64>>> = Vec::new();
        let result = run_mehl(&store, &mut obj, &cfg, RunOptions::new(&mut |e| match e {
            Event::BatchStart { outer_pass, model_batch, hyperplane } => {
                batches.push((*outer_pass, *model_batch, hyperplane.members.clone()));
            }
            Event::Step { hyperplane, .. } => {
                let alpha = hyperplane.alpha();
                lambdas.push((0..n).filter(|&j| j != base)
                    .map(|j| alpha.iter().map(|row| row[j]).collect()).collect());
            }
            _ => {}
        })).unwrap();
        prop_assert_eq!(batches.len(), passes * k.div_ceil(b));
        let (ref_losses, ref_lambdas) =
            full_graph_adamerging(&store, base, &mut obj, &cfg, layer_wise, &batches);
        same_trajectory(&result, &lambdas, &ref_losses, &ref_lambdas)?;
    }
}

// §3.9 with b < K: the base is in no model batch, every task model in exactly one per pass, α
// sums to 1 per block and reconstructs θ after every step, λ stays in its clamp range.
proptest! {
    #![proptest_config(cases(32))]
    #[test]
    fn adamerging_in_model_batches_keeps_the_invariants(
        k in 2usize..7, b in 1usize..4, base_pick in 0usize..7, layer_wise in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let n = k + 1;
        let base = base_pick % n;
        let store = zoo(n, seed, DType::F64);
        let mut obj = objective(16, 8, seed, DType::F64);
        let cfg = MehlConfig {
            optimizer: OptimizerKind::ADAMW,
            lr: 0.2,
            ..adamerging_config(b, base, layer_wise, TaskVectors::adamerging(base), 0.0, seed)
        };
        let mut members_seen = Vec::new();
        let mut checked = 0;
        let result = run_mehl(&store, &mut obj, &cfg, RunOptions::new(&mut |e| match e {
            Event::BatchStart { hyperplane, .. } => {
                assert!(!hyperplane.members.contains(&base));
                assert!(hyperplane.batch_len() <= b);
                members_seen.extend(hyperplane.members.clone());
            }
            Event::Step { hyperplane, .. } => {
                let alpha = hyperplane.alpha();
                let theta = host_blocks(&hyperplane.theta_blocks().unwrap()).unwrap();
                let naive = soup_from_alpha(&store, &hyperplane.blocks, &alpha).unwrap();
                assert!(rel_err(&theta.concat(), &naive.concat()) <= 1e-10);
                for row in &alpha {
                    assert!((row.iter().sum::<f64>() - 1.0).abs() <= 1e-12);
                    for (j, a) in row.iter().enumerate() {
                        assert!(j == base || (0.0..=1.0).contains(a), "λ {a}");
                    }
                }
                checked += 1;
            }
            _ => {}
        })).unwrap();
        members_seen.sort_unstable();
        let tasks: Vec<usize> = (0..n).filter(|&j| j != base).collect();
        prop_assert_eq!(members_seen, tasks);
        prop_assert_eq!(checked, result.history.len());
        prop_assert!(checked > 0);
    }
}

// §3.9 / §5.6: AdaMerging's tensor memory through MEHL depends on b, not on the number of
// tasks K.
#[test]
fn adamerging_memory_is_independent_of_the_number_of_tasks() {
    let b = 2;
    let d = ARCH.layout().numel();
    let mut bytes = Vec::new();
    for k in [4, 12] {
        let store = zoo(k + 1, 5, DType::F64);
        let mut obj = objective(16, 8, 5, DType::F64);
        let cfg = adamerging_config(b, 0, true, TaskVectors::adamerging(0), 0.0, 5);
        let result = run_mehl(&store, &mut obj, &cfg, RunOptions::default()).unwrap();
        assert_eq!(result.memory.directions, b * d * 8);
        assert!(result.memory.tensor_bytes() <= (b + 4) * d * 8);
        bytes.push(result.memory.tensor_bytes());
    }
    assert_eq!(bytes[0], bytes[1]);
}

// The initial soup is AdaMerging's: θ_0 + prior · Σ τ_k; with a zero learning rate nothing moves.
#[test]
fn adamerging_starts_at_the_prior() {
    let (k, base) = (3, 1);
    let store = zoo(k + 1, 9, DType::F64);
    let mut obj = objective(16, 8, 9, DType::F64);
    let cfg = MehlConfig {
        lr: 1e-300,
        ..adamerging_config(k, base, false, TaskVectors::adamerging(base), 0.0, 9)
    };
    let result = run_mehl(&store, &mut obj, &cfg, RunOptions::default()).unwrap();
    let want: Vec<f64> = (0..=k)
        .map(|j| if j == base { 1.0 - 0.3 * k as f64 } else { 0.3 })
        .collect();
    assert!(
        rel_err(&result.alpha[0], &want) <= 1e-12,
        "{:?}",
        result.alpha
    );
}

/// TIES-Merging written per coordinate from the paper, all task vectors resident.
fn naive_ties(store: &MemoryStore, base: usize, density: f64) -> Vec<f64> {
    let theta_0 = flat(&store.models[base]).concat();
    let taus: Vec<Vec<f64>> = (0..store.models.len())
        .filter(|&j| j != base)
        .map(|j| {
            let m = flat(&store.models[j]).concat();
            m.iter().zip(&theta_0).map(|(m, b)| m - b).collect()
        })
        .collect();
    let d = theta_0.len();
    let trimmed: Vec<Vec<f64>> = taus
        .iter()
        .map(|tau| {
            let mut mags: Vec<f64> = tau.iter().map(|v| v.abs()).collect();
            mags.sort_by(f64::total_cmp);
            let k = d - (d as f64 * density).floor() as usize;
            let kth = if k == 0 { 0.0 } else { mags[k - 1] };
            tau.iter()
                .map(|&v| if v.abs() >= kth { v } else { 0.0 })
                .collect()
        })
        .collect();
    let sign = |v: f64| {
        if v > 0.0 {
            1.0
        } else if v < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    let sums: Vec<f64> = (0..d).map(|i| trimmed.iter().map(|t| t[i]).sum()).collect();
    let majority = sign(sums.iter().map(|&s| sign(s)).sum());
    (0..d)
        .map(|i| {
            let s = match sign(sums[i]) {
                0.0 => majority,
                s => s,
            };
            let agreeing: Vec<f64> = trimmed
                .iter()
                .map(|t| t[i])
                .filter(|&v| v != 0.0 && sign(v) == s)
                .collect();
            agreeing.iter().sum::<f64>() / (agreeing.len().max(1) as f64)
        })
        .collect()
}

proptest! {
    #![proptest_config(cases(32))]
    #[test]
    fn ties_and_task_arithmetic_match_their_naive_definitions(
        k in 1usize..6, base_pick in 0usize..6,
        density in prop_oneof![Just(0.2), Just(0.5), Just(1.0)], lambda in 0.1f64..1.5,
        seed in any::<u64>(),
    ) {
        let n = k + 1;
        let base = base_pick % n;
        let store = zoo(n, seed, DType::F64);
        let ties = ties_merging(&store, base, density).unwrap();
        let got = flat(&ties.tau).concat();
        let want = naive_ties(&store, base, density);
        prop_assert!(rel_err(&got, &want) <= 1e-12, "{:?} vs {:?}", got, want);
        // θ_0 + λ τ.
        let merged = flat(&ties.at(lambda).unwrap()).concat();
        let theta_0 = flat(&store.models[base]).concat();
        let naive: Vec<f64> = theta_0.iter().zip(&want).map(|(b, t)| b + lambda * t).collect();
        prop_assert!(rel_err(&merged, &naive) <= 1e-12);

        let ta = task_arithmetic(&store, base).unwrap();
        let sum: Vec<f64> = (0..theta_0.len()).map(|i| {
            (0..n).filter(|&j| j != base)
                .map(|j| flat(&store.models[j]).concat()[i] - theta_0[i]).sum()
        }).collect();
        prop_assert!(rel_err(&flat(&ta.tau).concat(), &sum) <= 1e-12);
    }
}

#[test]
fn the_base_must_be_a_model_of_the_zoo() {
    let store = zoo(3, 1, DType::F64);
    let mut obj = objective(16, 8, 1, DType::F64);
    let cfg = adamerging_config(2, 3, false, TaskVectors::adamerging(3), 0.0, 1);
    let err = run_mehl(&store, &mut obj, &cfg, RunOptions::default()).unwrap_err();
    assert!(err.to_string().contains("base"), "{err}");
    assert!(ties_merging(&store, 3, 0.2).is_err());
    assert!(ties_merging(&store, 0, 0.0).is_err());
    let one = zoo(1, 1, DType::F64);
    assert!(task_arithmetic(&one, 0).is_err());
}
