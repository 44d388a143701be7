//! One test per invariant of spec §5 (items 1–8 and 10), on small MLP zoos.

mod common;

use approx::assert_relative_eq;
use candle_core::{DType, Tensor, Var};
use common::{config, cut, objective, zoo, ARCH};
use proptest::prelude::*;
use soup_core::rng::SplitMix64;
use soup_core::RunOptions;
use soup_core::{
    clip_global_norm, epoch_seed, from_blocks, global_norm, run_mehl, to_blocks, Batch, BlockCut,
    Directions, Event, Hyperplane, MehlConfig, Objective, OptimizerKind, StepSchedule,
};
use verify::{host_blocks, rel_err, soup_from_alpha, MemoryStore};

/// The authors' unit directions, or the models' differences from the center.
fn directions(difference: bool) -> Directions {
    if difference {
        Directions::Difference
    } else {
        Directions::Unit
    }
}

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// §5.1: per block, α sums to 1 and reconstructs θ, after every step and every model batch.
proptest! {
    #![proptest_config(cases(64))]
    #[test]
    fn alpha_sums_to_one_and_reconstructs_theta(
        n in 2usize..7, b in 1usize..7, k in 0usize..4, outer in 1usize..3, seed in any::<u64>(),
        difference in any::<bool>(),
    ) {
        let store = zoo(n, seed, DType::F64);
        let mut obj = objective(24, 8, seed, DType::F64);
        let cfg = MehlConfig { directions: directions(difference), ..config(b, cut(k), outer, seed) };
        let mut checked = 0;
        let mut check = |hp: &Hyperplane| {
            let alpha = hp.alpha();
            for row in &alpha {
                assert!((row.iter().sum::<f64>() - 1.0).abs() <= 1e-12, "Σα = {}", row.iter().sum::<f64>());
            }
            let theta = host_blocks(&hp.theta_blocks().unwrap()).unwrap();
            let naive = soup_from_alpha(&store, &hp.blocks, &alpha).unwrap();
            for (t, r) in theta.iter().zip(&naive) {
                assert!(rel_err(t, r) <= 1e-9, "θ ≠ Σ α θ_j: {}", rel_err(t, r));
            }
            checked += 1;
        };
        let result = run_mehl(&store, &mut obj, &cfg, RunOptions::new(&mut |e| match e {
            Event::Step { hyperplane, .. } | Event::BatchEnd { hyperplane, .. } => check(hyperplane),
            Event::BatchStart { .. } | Event::LearnedStep { .. } => {}
        })).unwrap();
        prop_assert!(checked > 0);
        // The returned soup is the one its α describe.
        let soup = host_blocks(&to_blocks(&result.soup, &result.blocks).unwrap()).unwrap();
        let naive = soup_from_alpha(&store, &result.blocks, &result.alpha).unwrap();
        for (t, r) in soup.iter().zip(&naive) {
            prop_assert!(rel_err(t, r) <= 1e-9);
        }
    }
}

/// In f32 the α bookkeeping still sums to 1 within 1e-5 and describes θ to f32 precision.
#[test]
fn alpha_sums_to_one_in_f32() {
    let store = zoo(6, 3, DType::F32);
    let mut obj = objective(24, 8, 3, DType::F32);
    let result = run_mehl(
        &store,
        &mut obj,
        &config(4, BlockCut::PER_TENSOR, 2, 3),
        RunOptions::default(),
    )
    .unwrap();
    for row in &result.alpha {
        assert!((row.iter().sum::<f64>() - 1.0).abs() <= 1e-5);
    }
    let soup = host_blocks(&to_blocks(&result.soup, &result.blocks).unwrap()).unwrap();
    let naive = soup_from_alpha(&store, &result.blocks, &result.alpha).unwrap();
    for (t, r) in soup.iter().zip(&naive) {
        assert!(rel_err(t, r) <= 1e-5, "{}", rel_err(t, r));
    }
}

// §5.2: X = 0 at the start of every model batch; the soup then equals the previous soup, and the
// first start equals the mean of the first model batch.
proptest! {
    #![proptest_config(cases(32))]
    #[test]
    fn each_model_batch_starts_at_the_previous_soup(
        n in 2usize..8, b in 1usize..5, k in 0usize..4, seed in any::<u64>(),
    ) {
        let store = zoo(n, seed, DType::F64);
        let mut obj = objective(16, 8, seed, DType::F64);
        let mut previous: Option<Vec<Vec<f64>>> = None;
        let mut starts = 0;
        run_mehl(&store, &mut obj, &config(b, cut(k), 2, seed), RunOptions::new(&mut |e| match e {
            Event::BatchStart { hyperplane: hp, .. } => {
                assert!(hp.x.iter().all(|&x| x == 0.0));
                let theta = host_blocks(&hp.theta_blocks().unwrap()).unwrap();
                match &previous {
                    Some(p) => assert_eq!(&theta, p, "a model batch did not start at the soup"),
                    None => {
                        let mut alpha = vec![vec![0.0; n]; hp.blocks.len()];
                        for row in &mut alpha {
                            for &j in &hp.members {
                                row[j] = 1.0 / hp.members.len() as f64;
                            }
                        }
                        let mean = soup_from_alpha(&store, &hp.blocks, &alpha).unwrap();
                        for (t, m) in theta.iter().zip(&mean) {
                            assert!(rel_err(t, m) <= 1e-12);
                        }
                    }
                }
                starts += 1;
            }
            Event::BatchEnd { hyperplane, .. } => {
                previous = Some(host_blocks(&hyperplane.theta_blocks().unwrap()).unwrap());
            }
            Event::Step { .. } | Event::LearnedStep { .. } => {}
        })).unwrap();
        prop_assert_eq!(starts, 2 * n.div_ceil(b.min(n)));
    }
}

/// A hyperplane through the mean of `members` with coefficients X drawn from `seed`.
fn random_hyperplane(
    store: &MemoryStore,
    members: &[usize],
    cut: &BlockCut,
    seed: u64,
) -> Hyperplane {
    let layout = ARCH.layout();
    let blocks = cut.blocks(&layout).unwrap();
    let n = store.models.len();
    let mut alpha = vec![vec![0.0; n]; blocks.len()];
    for row in &mut alpha {
        for &j in members {
            row[j] = 1.0 / members.len() as f64;
        }
    }
    let mean = soup_from_alpha(store, &blocks, &alpha).unwrap();
    let center = mean
        .into_iter()
        .map(|v| Tensor::new(v, &candle_core::Device::Cpu).unwrap())
        .collect();
    let mut hp = Hyperplane::new(layout, blocks, center, alpha, members.to_vec(), |j| {
        Ok((store.name(j), store.models[j].clone()))
    })
    .unwrap();
    let mut rng = SplitMix64::new(seed);
    for x in hp.x.iter_mut() {
        *x = 2.0 * rng.next_f64() - 1.0;
    }
    hp
}

use soup_core::ModelStore;

// §5.3: the projected gradient ⟨∇θ, d_{i,l}⟩ equals autograd through c + Σ X d (X a variable,
// every direction in the graph) and central finite differences, in f64.
proptest! {
    #![proptest_config(cases(64))]
    #[test]
    fn projected_gradient_matches_autograd_and_finite_differences(
        n in 2usize..6, k in 0usize..4, seed in any::<u64>(),
    ) {
        let store = zoo(n, seed, DType::F64);
        let mut obj = objective(16, 16, seed, DType::F64);
        let members: Vec<usize> = (0..n).collect();
        let mut hp = random_hyperplane(&store, &members, &cut(k), seed);
        let batch = Batch { epoch_seed: seed, index: 0 };
        let (_, grad) = obj.loss_and_grad(&hp.theta().unwrap(), batch).unwrap();
        let projected = hp.project(&grad).unwrap();
        // The projection with ‖∇θ‖ from the same pass (what a MEHL step runs): the same
        // projection and the bits of a norm computed on its own.
        let (projected_too, norm) = hp.project_and_norm(&grad).unwrap();
        prop_assert_eq!(&projected_too, &projected);
        prop_assert_eq!(norm.to_bits(), soup_core::global_norm(&grad).unwrap().to_bits());

        // Autograd with X as a variable.
        let (b, l) = (hp.batch_len(), hp.num_blocks());
        let x = Var::from_vec(hp.x.clone(), (b, l), &candle_core::Device::Cpu).unwrap();
        let theta_blocks: Vec<Tensor> = (0..l)
            .map(|j| {
                let col = x.as_tensor().narrow(1, j, 1).unwrap().t().unwrap();
                (&hp.center()[j] + col.matmul(hp.directions(j)).unwrap().squeeze(0).unwrap()).unwrap()
            })
            .collect();
        let theta = from_blocks(&theta_blocks, &hp.blocks, &hp.layout).unwrap();
        let loss = obj.loss(&theta, None, batch).unwrap();
        let autograd = loss.backward().unwrap().get(x.as_tensor()).unwrap()
            .flatten_all().unwrap().to_vec1::<f64>().unwrap();
        prop_assert!(rel_err(&projected, &autograd) <= 1e-12, "autograd: {}", rel_err(&projected, &autograd));

        // Central finite differences.
        let h = 1e-5;
        let mut fd = vec![0.0; projected.len()];
        for (p, slot) in fd.iter_mut().enumerate() {
            let mut f = |delta: f64, hp: &mut Hyperplane| {
                hp.x[p] += delta;
                let v = obj.loss(&hp.theta().unwrap(), None, batch).unwrap().to_scalar::<f64>().unwrap();
                hp.x[p] -= delta;
                v
            };
            *slot = (f(h, &mut hp) - f(-h, &mut hp)) / (2.0 * h);
        }
        prop_assert!(rel_err(&projected, &fd) <= 1e-6, "finite differences: {}", rel_err(&projected, &fd));
    }
}

/// An independent full-graph hyperplane learned soup (spec §5 item 4): all N models resident,
/// c their mean, X a variable with every direction in the graph, SGD by hand. Returns the loss
/// of every step and α after every step.
fn full_graph_hyperplane_soup(
    store: &MemoryStore,
    obj: &mut verify::MlpObjective,
    cfg: &MehlConfig,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = store.models.len();
    let layout = ARCH.layout();
    let flat: Vec<Vec<f64>> = store
        .models
        .iter()
        .map(|m| {
            m.iter()
                .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
                .collect()
        })
        .collect();
    let dim = flat[0].len();
    let c: Vec<f64> = (0..dim)
        .map(|k| flat.iter().map(|m| m[k]).sum::<f64>() / n as f64)
        .collect();
    let mut norms = vec![0.0; n];
    let mut dirs = vec![0.0; n * dim];
    for j in 0..n {
        let diff: Vec<f64> = (0..dim).map(|k| flat[j][k] - c[k]).collect();
        norms[j] = diff.iter().map(|v| v * v).sum::<f64>().sqrt();
        // With difference directions X is the change of α: the same as a norm of 1 here.
        if cfg.directions == Directions::Difference {
            norms[j] = 1.0;
        }
        for k in 0..dim {
            dirs[j * dim + k] = diff[k] / norms[j];
        }
    }
    let dev = candle_core::Device::Cpu;
    let c_t = Tensor::from_vec(c, dim, &dev).unwrap();
    let d_t = Tensor::from_vec(dirs, (n, dim), &dev).unwrap();
    let OptimizerKind::Sgd { momentum } = cfg.optimizer else {
        panic!("the reference runs SGD")
    };
    let mut x = vec![0.0; n];
    let mut buf = vec![0.0; n];
    let steps_per_epoch = obj.num_batches();
    let total = cfg.inner_epochs * steps_per_epoch;
    let (mut losses, mut alphas) = (Vec::new(), Vec::new());
    for epoch in 0..cfg.inner_epochs {
        for index in 0..steps_per_epoch {
            let s = epoch * steps_per_epoch + index;
            let xv = Var::from_vec(x.clone(), (1, n), &dev).unwrap();
            let theta_flat =
                (&c_t + xv.as_tensor().matmul(&d_t).unwrap().squeeze(0).unwrap()).unwrap();
            let mut offset = 0;
            let theta: Vec<Tensor> = layout
                .tensors
                .iter()
                .map(|t| {
                    let v = theta_flat
                        .narrow(0, offset, t.numel())
                        .unwrap()
                        .reshape(t.shape.as_slice())
                        .unwrap();
                    offset += t.numel();
                    v
                })
                .collect();
            let batch = Batch {
                epoch_seed: epoch_seed(cfg.seed, 0, 0, epoch),
                index,
            };
            let loss = obj.loss(&theta, None, batch).unwrap();
            losses.push(loss.to_scalar::<f64>().unwrap());
            let g = loss
                .backward()
                .unwrap()
                .get(xv.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let w = (0.2 * total as f64).floor() as usize;
            let lr = if s < w {
                cfg.lr * (s + 1) as f64 / w as f64
            } else {
                cfg.lr
                    * 0.5
                    * (1.0 + (std::f64::consts::PI * (s - w) as f64 / (total - w) as f64).cos())
            };
            for j in 0..n {
                let d = g[j] + cfg.weight_decay * x[j];
                buf[j] = if s == 0 { d } else { momentum * buf[j] + d };
                x[j] -= lr * buf[j];
            }
            let shift: f64 = (0..n).map(|j| x[j] / norms[j]).sum();
            alphas.push(
                (0..n)
                    .map(|j| (1.0 - shift) / n as f64 + x[j] / norms[j])
                    .collect(),
            );
        }
    }
    (losses, alphas)
}

// §5.4: with b = N, one block, one outer pass and SGD, MEHL is the full-graph hyperplane learned
// soup, step for step.
proptest! {
    #![proptest_config(cases(64))]
    #[test]
    fn mehl_equals_the_full_graph_hyperplane_soup(
        n in 2usize..7, momentum in prop_oneof![Just(0.0), Just(0.9)], seed in any::<u64>(),
        difference in any::<bool>(),
    ) {
        let store = zoo(n, seed, DType::F64);
        let mut obj = objective(24, 8, seed, DType::F64);
        let cfg = MehlConfig {
            directions: directions(difference),
            optimizer: OptimizerKind::Sgd { momentum },
            clip_grad_norm: None,
            lr: 0.5,
            ..config(n, BlockCut::WHOLE, 1, seed)
        };
        let mut alphas = Vec::new();
        let result = run_mehl(&store, &mut obj, &cfg, RunOptions::new(&mut |e| {
            if let Event::Step { hyperplane, .. } = e {
                alphas.push(hyperplane.alpha()[0].clone());
            }
        })).unwrap();
        let (ref_losses, ref_alphas) = full_graph_hyperplane_soup(&store, &mut obj, &cfg);
        let losses: Vec<f64> = result.history.iter().map(|r| r.loss).collect();
        prop_assert_eq!(losses.len(), ref_losses.len());
        for (s, (a, r)) in losses.iter().zip(&ref_losses).enumerate() {
            prop_assert!((a - r).abs() <= 1e-9 * r.abs().max(1.0), "loss at step {}: {} vs {}", s, a, r);
        }
        for (s, (a, r)) in alphas.iter().zip(&ref_alphas).enumerate() {
            prop_assert!(rel_err(a, r) <= 1e-9, "α at step {}: {:?} vs {:?}", s, a, r);
        }
    }
}

// §5.5: every direction has unit norm per block (difference directions: ‖θ_i − c‖), or is zero
// when guarded (a block that is the same in every model, or a model batch of one at the start).
proptest! {
    #![proptest_config(cases(64))]
    #[test]
    fn directions_have_unit_norm_or_are_zero(
        n in 1usize..6, b in 1usize..4, k in 0usize..4, seed in any::<u64>(), f32 in any::<bool>(),
        difference in any::<bool>(),
    ) {
        // f32 models take the fused CPU kernel that writes each direction from the model's
        // tensors (`kernels::direction_row`); f64 ones candle's ops.
        let (dtype, tol) = if f32 { (DType::F32, 1e-6) } else { (DType::F64, 1e-12) };
        // layers.0.bias is frozen: the same in every model.
        let store = MemoryStore::mlp_zoo(ARCH, n, seed, dtype, &[1]).unwrap();
        let mut obj = objective(16, 8, seed, dtype);
        let mut zero_rows = 0;
        let cfg = MehlConfig { directions: directions(difference), ..config(b, cut(k), 1, seed) };
        let result = run_mehl(&store, &mut obj, &cfg, RunOptions::new(&mut |e| {
            if let Event::BatchStart { hyperplane: hp, .. } = e {
                for l in 0..hp.num_blocks() {
                    let rows = hp.directions(l).to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
                    for (i, row) in rows.iter().enumerate() {
                        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
                        if hp.norm(i, l) == 0.0 {
                            assert_eq!(norm, 0.0);
                            zero_rows += 1;
                        } else if difference {
                            // d = θ_i − c itself.
                            let want = hp.norm(i, l);
                            assert!((norm - want).abs() <= tol * want, "‖d‖ = {norm}, ‖θ_i − c‖ = {want}");
                        } else {
                            assert!((norm - 1.0).abs() <= tol, "‖d‖ = {norm}");
                        }
                    }
                }
            }
        })).unwrap();
        // The frozen tensor is a block of its own per tensor; a first batch of one model is its
        // own mean.
        if cut(k) == BlockCut::PER_TENSOR || b.min(n) == 1 {
            prop_assert!(zero_rows > 0);
        }
        for row in &result.alpha {
            prop_assert!(row.iter().all(|a| a.is_finite()));
            prop_assert!((row.iter().sum::<f64>() - 1.0).abs() <= 1e-12);
        }
        for t in &result.soup {
            let t = t.to_dtype(DType::F64).unwrap();
            prop_assert!(t.flatten_all().unwrap().to_vec1::<f64>().unwrap().iter().all(|v| v.is_finite()));
        }
    }
}

/// Difference directions (spec §3.4) bound α where unit directions blow it up: in a tensor the
/// models barely change (spread 1e-4 of the others'), an ordinary X is an α of 1/‖θ_i − c‖ times
/// it with unit directions, but the change of α itself with difference directions, so Adam's
/// bounded steps bound every α.
#[test]
fn difference_directions_bound_alpha_in_a_tensor_the_models_barely_change() {
    let mut store = zoo(4, 7, DType::F64);
    let tiny = 1; // layers.0.bias
    let stacked: Vec<Tensor> = store.models.iter().map(|m| m[tiny].clone()).collect();
    let mean = Tensor::stack(&stacked, 0).unwrap().mean(0).unwrap();
    for m in &mut store.models {
        m[tiny] = (&mean + ((&m[tiny] - &mean).unwrap() * 1e-4).unwrap()).unwrap();
    }
    let run = |directions| {
        let mut obj = objective(24, 8, 7, DType::F64);
        let cfg = MehlConfig {
            directions,
            ..config(4, BlockCut::PER_TENSOR, 1, 7)
        };
        run_mehl(&store, &mut obj, &cfg, RunOptions::default()).unwrap()
    };
    let largest = |alpha: &[f64]| alpha.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    let difference = run(Directions::Difference);
    // Adam's bias-corrected step is at most about lr in the first few steps (≤ 1.02 lr for
    // these 6): |X| ≤ B = 2 Σ lr_s and |α_j| ≤ γ_j (1 + b B) + B with γ_j = 1/4, b = 4.
    let steps: f64 = difference.history.iter().map(|r| r.lr).sum();
    assert_eq!(difference.history.len(), 6);
    let bound = 2.0 * steps;
    let alpha_bound = 0.25 * (1.0 + 4.0 * bound) + bound;
    for row in &difference.alpha {
        assert!(largest(row) <= alpha_bound, "{row:?} beyond {alpha_bound}");
    }
    let unit = run(Directions::Unit);
    assert!(
        largest(&unit.alpha[tiny]) > 10.0 * alpha_bound,
        "unit directions: α of the tiny tensor {:?}",
        unit.alpha[tiny]
    );
}

// §5.6: the memory held by MEHL is the same for N = 8 and N = 32 at fixed b, and at most
// (b + 4)·D floats plus O(b·L); Learned-Soup's grows with N.
#[test]
fn memory_is_independent_of_the_number_of_models() {
    let b = 4;
    let d = ARCH.layout().numel();
    let float = 8; // f64
    let mut accounts = Vec::new();
    for n in [8, 32] {
        let store = zoo(n, 11, DType::F64);
        let mut obj = objective(16, 8, 11, DType::F64);
        let result = run_mehl(
            &store,
            &mut obj,
            &config(b, BlockCut::PER_TENSOR, 1, 11),
            RunOptions::default(),
        )
        .unwrap();
        let l = result.blocks.len();
        assert!(result.memory.tensor_bytes() <= (b + 4) * d * float);
        assert_eq!(result.memory.directions, b * d * float);
        // X, its norms, AdamW's two moments (b·L each) and the α bookkeeping (N·L).
        assert!(result.memory.coefficients <= (4 * b * l + n * l) * 8);
        let learned = soup_core::learned_soup(
            &store,
            &mut obj,
            &soup_core::LearnedConfig {
                epochs: 1,
                ..soup_core::LearnedConfig::learned_plus()
            },
            RunOptions::default(),
        )
        .unwrap();
        accounts.push((result.memory, learned.memory));
    }
    assert_eq!(accounts[0].0.tensor_bytes(), accounts[1].0.tensor_bytes());
    assert_eq!(accounts[1].1.models, 4 * accounts[0].1.models);
    assert!(accounts[1].1.tensor_bytes() > accounts[1].0.tensor_bytes());
}

/// The authors' `layer_size` rule, written naively.
fn naive_layer_size(sizes: &[usize], s: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut count) = (0, 0);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && count > s {
            out.push(start..i);
            start = i;
            count = 0;
        }
        count += size;
    }
    out.push(start..sizes.len());
    out
}

// §5.7: block cuts are contiguous and cover every tensor exactly once.
proptest! {
    #![proptest_config(cases(256))]
    #[test]
    fn block_cuts_are_contiguous_and_cover_every_tensor_once(
        sizes in prop::collection::vec(1usize..50, 1..30), s in 0usize..200,
        layer_of in prop::collection::vec(prop::option::of(0usize..4), 30),
    ) {
        let layout = soup_core::ParamLayout::new(sizes.iter().enumerate().map(|(i, &n)| soup_core::TensorSpec {
            name: match layer_of[i] {
                Some(layer) => format!("enc.layers.{layer}.t{i}"),
                None => format!("t{i}"),
            },
            shape: vec![n],
        }).collect());
        for cut in [BlockCut::LayerSize(s), BlockCut::PerLayer { marker: "layers.".into() }, BlockCut::WHOLE, BlockCut::PER_TENSOR] {
            let blocks = cut.blocks(&layout).unwrap();
            let mut next = 0;
            for b in &blocks {
                prop_assert_eq!(b.tensors.start, next);
                prop_assert!(b.tensors.end > b.tensors.start);
                prop_assert_eq!(b.numel, sizes[b.tensors.clone()].iter().sum::<usize>());
                next = b.tensors.end;
            }
            prop_assert_eq!(next, sizes.len());
        }
        let got: Vec<_> = BlockCut::LayerSize(s).blocks(&layout).unwrap().into_iter().map(|b| b.tensors).collect();
        prop_assert_eq!(got, naive_layer_size(&sizes, s));
        prop_assert_eq!(BlockCut::WHOLE.blocks(&layout).unwrap().len(), 1);
        prop_assert_eq!(BlockCut::PER_TENSOR.blocks(&layout).unwrap().len(), sizes.len());
    }
}

// §5.7: each outer pass visits every model once, and a model batch loads only its own models.
proptest! {
    #![proptest_config(cases(64))]
    #[test]
    fn each_outer_pass_visits_every_model_once(
        n in 1usize..10, b in 1usize..5, outer in 1usize..4, seed in any::<u64>(),
    ) {
        let store = zoo(n, seed, DType::F64);
        let mut obj = objective(8, 8, seed, DType::F64);
        let mut passes: Vec<Vec<usize>> = vec![Vec::new(); outer];
        let mut loads_ok = true;
        run_mehl(&store, &mut obj, &config(b, BlockCut::WHOLE, outer, seed), RunOptions::new(&mut |e| {
            if let Event::BatchStart { outer_pass, model_batch, hyperplane } = e {
                assert!(hyperplane.batch_len() <= b);
                passes[*outer_pass].extend(&hyperplane.members);
                // The first batch reads its models twice (mean, then directions); later ones once.
                let mut loads = store.take_loads();
                let mut expected = hyperplane.members.clone();
                if *model_batch == 0 {
                    expected.extend(&hyperplane.members);
                }
                loads.sort_unstable();
                expected.sort_unstable();
                loads_ok &= loads == expected;
            }
        })).unwrap();
        prop_assert!(loads_ok, "a model batch loaded models outside the batch");
        for p in &mut passes {
            p.sort_unstable();
            prop_assert_eq!(&p[..], &(0..n).collect::<Vec<_>>()[..]);
        }
    }
}

// §5.8: the schedule matches its formulas, in the driver too.
proptest! {
    #![proptest_config(cases(64))]
    #[test]
    fn schedules_match_their_formulas(steps in 1usize..400, frac in 0.0f64..0.9, eta in 1e-4f64..1.0) {
        let sched = StepSchedule::WarmupCosine { warmup_fraction: frac };
        let w = (frac * steps as f64).floor() as usize;
        for s in 0..steps {
            let expected = if s < w {
                eta * (s + 1) as f64 / w as f64
            } else {
                eta * 0.5 * (1.0 + (std::f64::consts::PI * (s - w) as f64 / (steps - w) as f64).cos())
            };
            assert_relative_eq!(sched.lr(eta, s, steps), expected, max_relative = 1e-15);
            prop_assert!(sched.lr(eta, s, steps) <= eta * (1.0 + 1e-15));
        }
        prop_assert_eq!(StepSchedule::Constant.lr(eta, steps / 2, steps), eta);
    }
}

#[test]
fn driver_follows_the_schedule_in_every_model_batch() {
    let store = zoo(5, 2, DType::F64);
    let mut obj = objective(40, 8, 2, DType::F64); // 5 batches × 2 epochs = S = 10 steps
    let cfg = config(2, BlockCut::PER_TENSOR, 1, 2);
    let result = run_mehl(&store, &mut obj, &cfg, RunOptions::default()).unwrap();
    assert_eq!(result.history.len(), 3 * 10);
    for r in &result.history {
        assert_eq!(r.lr, cfg.schedule.lr(cfg.lr, r.step, 10));
    }
    // The warm-up restarts in every model batch.
    let firsts: Vec<f64> = result
        .history
        .iter()
        .filter(|r| r.step == 0)
        .map(|r| r.lr)
        .collect();
    assert_eq!(firsts, vec![cfg.lr / 2.0; 3]);
}

#[test]
fn convergence_rate_schedule_is_min_of_inverse_smoothness_and_scale_over_root_t() {
    let store = zoo(4, 5, DType::F64);
    let mut obj = objective(16, 8, 5, DType::F64); // 2 batches × 2 epochs × 2 model batches: T = 8
    let plain_sgd = |schedule| MehlConfig {
        optimizer: OptimizerKind::Sgd { momentum: 0.0 },
        schedule,
        ..config(2, BlockCut::WHOLE, 1, 5)
    };
    let given = plain_sgd(StepSchedule::ConvergenceRate {
        smoothness: Some(4.0),
        scale: 1.0,
    });
    let result = run_mehl(&store, &mut obj, &given, RunOptions::default()).unwrap();
    assert!(result.history.iter().all(|r| r.lr == 0.25));
    let given = plain_sgd(StepSchedule::ConvergenceRate {
        smoothness: Some(0.1),
        scale: 2.0,
    });
    let result = run_mehl(&store, &mut obj, &given, RunOptions::default()).unwrap();
    assert!(result.history.iter().all(|r| r.lr == 2.0 / 8f64.sqrt()));
    // Estimated β: a positive finite step no larger than scale/√T.
    let estimated = plain_sgd(StepSchedule::ConvergenceRate {
        smoothness: None,
        scale: 1.0,
    });
    let result = run_mehl(&store, &mut obj, &estimated, RunOptions::default()).unwrap();
    for r in &result.history {
        assert!(r.lr.is_finite() && r.lr > 0.0 && r.lr <= 1.0 / 8f64.sqrt());
    }
}

// §5.8: clipping uses the global norm of ∇θ, like torch.nn.utils.clip_grad_norm_.
proptest! {
    #![proptest_config(cases(128))]
    #[test]
    fn clipping_uses_the_global_norm(values in prop::collection::vec(-10.0f64..10.0, 2..40), split in 1usize..39, max in 0.1f64..20.0) {
        let split = split.min(values.len() - 1);
        let dev = candle_core::Device::Cpu;
        let mut grads = vec![
            Tensor::new(&values[..split], &dev).unwrap(),
            Tensor::new(&values[split..], &dev).unwrap(),
        ];
        let naive = values.iter().map(|v| v * v).sum::<f64>().sqrt();
        let norm = clip_global_norm(&mut grads, max).unwrap();
        assert_relative_eq!(norm, naive, max_relative = 1e-12);
        let coef = (max / (naive + 1e-6)).min(1.0);
        let clipped: Vec<f64> = grads.iter().flat_map(|g| g.to_vec1::<f64>().unwrap()).collect();
        for (c, v) in clipped.iter().zip(&values) {
            assert_relative_eq!(*c, v * coef, max_relative = 1e-12);
        }
        assert_relative_eq!(global_norm(&grads).unwrap(), naive * coef, max_relative = 1e-12);
    }
}

#[test]
fn recorded_gradient_norm_is_the_global_norm_before_clipping() {
    let store = zoo(3, 8, DType::F64);
    let mut obj = objective(8, 8, 8, DType::F64);
    let cfg = MehlConfig {
        clip_grad_norm: Some(1e-3),
        ..config(3, BlockCut::WHOLE, 1, 8)
    };
    let result = run_mehl(&store, &mut obj, &cfg, RunOptions::default()).unwrap();
    let mean = soup_core::uniform_soup(&store, RunOptions::default())
        .unwrap()
        .soup;
    let batch = Batch {
        epoch_seed: epoch_seed(cfg.seed, 0, 0, 0),
        index: 0,
    };
    let (_, grad) = obj.loss_and_grad(&mean, batch).unwrap();
    assert_relative_eq!(
        result.history[0].grad_norm,
        global_norm(&grad).unwrap(),
        max_relative = 1e-9
    );
}

// §5.10: same seed and inputs ⇒ bit-identical soup; another seed ⇒ another soup.
#[test]
fn same_seed_gives_a_bit_identical_soup() {
    let run = |seed| {
        let store = zoo(7, 4, DType::F32);
        let mut obj = objective(32, 8, 4, DType::F32);
        let r = run_mehl(
            &store,
            &mut obj,
            &config(3, BlockCut::PER_TENSOR, 2, seed),
            RunOptions::default(),
        )
        .unwrap();
        let bits: Vec<u32> = r
            .soup
            .iter()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(f32::to_bits)
            .collect();
        let alpha: Vec<u64> = r.alpha.iter().flatten().map(|a| a.to_bits()).collect();
        (bits, alpha)
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1).0, run(2).0);
}

// A run stopped after any model batch and resumed from its progress ends with the same soup and
// history, bit for bit.
proptest! {
    #![proptest_config(cases(16))]
    #[test]
    fn resumed_run_equals_the_uninterrupted_run(
        n in 2usize..8, b in 1usize..4, outer in 1usize..3, stop in 0usize..6, seed in any::<u64>(),
    ) {
        let store = zoo(n, seed, DType::F64);
        let mut obj = objective(16, 8, seed, DType::F64);
        let cfg = config(b, BlockCut::PER_TENSOR, outer, seed);
        let mut saved = Vec::new();
        let full = run_mehl(&store, &mut obj, &cfg, RunOptions::new(&mut |e| {
            if let Event::BatchEnd { progress, .. } = e {
                saved.push((*progress).clone());
            }
        })).unwrap();
        let progress = saved[stop % saved.len()].clone();
        let resumed = soup_core::run_mehl(&store, &mut obj, &cfg, RunOptions::default().resume(Some(progress))).unwrap();
        let bits = |r: &soup_core::SoupResult| -> Vec<u64> {
            r.soup.iter().flat_map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap()).map(f64::to_bits).collect()
        };
        prop_assert_eq!(bits(&full), bits(&resumed));
        prop_assert_eq!(&full.alpha, &resumed.alpha);
        prop_assert_eq!(&full.history, &resumed.history);
    }
}

// §3.7: a run over W processes (threads here, each with its own store and data shard) ends with
// the soup, α and loss history of the one-process run, and each process loads only its share
// ⌈b/W⌉ of every model batch and holds only those directions.
proptest! {
    #![proptest_config(cases(24))]
    #[test]
    fn a_run_over_several_processes_equals_the_one_process_run(
        n in 2usize..8, b in 1usize..6, world in 2usize..4, outer in 1usize..3,
        examples in 10usize..26, seed in any::<u64>(), difference in any::<bool>(),
    ) {
        let cfg = MehlConfig { directions: directions(difference), ..config(b, BlockCut::PER_TENSOR, outer, seed) };
        let single = run_mehl(&zoo(n, seed, DType::F64), &mut objective(examples, 8, seed, DType::F64), &cfg, RunOptions::default()).unwrap();
        let ranks = verify::ThreadCollective::world(world);
        let results: Vec<(soup_core::SoupResult, Vec<usize>, usize)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|comm| {
                    let cfg = &cfg;
                    s.spawn(move || {
                        let store = zoo(n, seed, DType::F64);
                        let mut obj = objective(examples, 8, seed, DType::F64);
                        let mut max_rows = 0;
                        let r = soup_core::run_mehl(&store, &mut obj, cfg, RunOptions::new(&mut |e| {
                            if let Event::BatchStart { hyperplane, .. } = e {
                                max_rows = max_rows.max(hyperplane.batch_len());
                            }
                        }).resume(None).on(&comm)).unwrap();
                        let loads = store.loads.borrow().clone();
                        (r, loads, max_rows)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let bk = b.min(n);
        let k = bk.div_ceil(world);
        let flat = |r: &soup_core::SoupResult| -> Vec<f64> {
            r.soup.iter().flat_map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap()).collect()
        };
        for (rank, (r, loads, max_rows)) in results.iter().enumerate() {
            prop_assert!(rel_err(&flat(r), &flat(&single)) <= 1e-9);
            for (a, e) in r.alpha.iter().flatten().zip(single.alpha.iter().flatten()) {
                prop_assert!((a - e).abs() <= 1e-9 * (1.0 + e.abs()), "α {} vs {}", a, e);
            }
            prop_assert_eq!(r.history.len(), single.history.len());
            for (h, e) in r.history.iter().zip(&single.history) {
                prop_assert!((h.loss - e.loss).abs() <= 1e-9 * (1.0 + e.loss.abs()));
            }
            // Rows and directions: at most ⌈b/W⌉ per process.
            prop_assert!(*max_rows <= k);
            prop_assert!(r.memory.directions <= k * ARCH.layout().numel() * 8);
            // Loads: the first center and every hyperplane read only this rank's share.
            let mut expected = Vec::new();
            for pass in 0..outer {
                let order = soup_core::rng::permutation(n, soup_core::rng::derive_seed(seed, &[0, pass as u64]));
                for (i, members) in order.chunks(bk).enumerate() {
                    let mine = soup_core::share(members, rank, world);
                    if pass == 0 && i == 0 {
                        expected.extend_from_slice(mine);
                    }
                    expected.extend_from_slice(mine);
                }
            }
            prop_assert_eq!(loads, &expected);
        }
    }
}
