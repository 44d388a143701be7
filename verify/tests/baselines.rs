//! The baselines of spec §2 against naive references.

mod common;

use candle_core::{DType, Tensor};
use common::{objective, zoo};
use proptest::prelude::*;
use soup_core::{
    greedy_soup, learned_soup, uniform_soup, BlockCut, GreedyAccept, LearnedConfig, Objective,
    RunOptions,
};
use verify::{host_blocks, rel_err, soup_from_alpha, MemoryStore};

fn mean_of(store: &MemoryStore, members: &[usize]) -> Vec<Tensor> {
    (0..store.models[0].len())
        .map(|t| {
            let sum = members
                .iter()
                .map(|&j| store.models[j][t].clone())
                .reduce(|a, b| (a + b).unwrap())
                .unwrap();
            (sum / members.len() as f64).unwrap()
        })
        .collect()
}

fn flat(tensors: &[Tensor]) -> Vec<f64> {
    tensors
        .iter()
        .flat_map(|t| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn uniform_soup_is_the_mean(n in 1usize..9, seed in any::<u64>()) {
        let store = zoo(n, seed, DType::F64);
        let result = uniform_soup(&store, RunOptions::default()).unwrap();
        let all: Vec<usize> = (0..n).collect();
        prop_assert!(rel_err(&flat(&result.soup), &flat(&mean_of(&store, &all))) <= 1e-12);
        prop_assert_eq!(&result.alpha, &vec![vec![1.0 / n as f64; n]]);
        // Streamed: every model read once.
        prop_assert_eq!(store.take_loads(), all);
    }

    /// Greedy-Soup against a naive reference that recomputes every candidate mean from scratch.
    #[test]
    fn greedy_soup_matches_a_naive_reference(n in 1usize..8, strict in any::<bool>(), seed in any::<u64>()) {
        let store = zoo(n, seed, DType::F64);
        let mut obj = objective(30, 30, seed, DType::F64);
        let accept = if strict { GreedyAccept::Improves } else { GreedyAccept::NotWorse };
        let result = greedy_soup(&store, &mut obj, accept, RunOptions::default()).unwrap();

        let acc = |obj: &mut verify::MlpObjective, p: &[Tensor]| obj.evaluate(p).unwrap().accuracy.unwrap();
        let scores: Vec<f64> = (0..n).map(|i| acc(&mut obj, &store.models[i])).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|a, b| scores[*b].partial_cmp(&scores[*a]).unwrap().then(a.cmp(b)));
        let mut soup = vec![order[0]];
        let mut best = scores[order[0]];
        for &i in &order[1..] {
            let mut candidate = soup.clone();
            candidate.push(i);
            let a = acc(&mut obj, &mean_of(&store, &candidate));
            if (strict && a > best) || (!strict && a >= best) {
                soup = candidate;
                best = a;
            }
        }
        let mut alpha = vec![0.0; n];
        for &i in &soup {
            alpha[i] = 1.0 / soup.len() as f64;
        }
        prop_assert_eq!(&result.alpha[0], &alpha);
        prop_assert!(rel_err(&flat(&result.soup), &flat(&mean_of(&store, &soup))) <= 1e-12);
        prop_assert_eq!(result.memory.models, 3 * flat(&store.models[0]).len() * 8);
    }
}

/// Learned-Soup(+): α on the simplex per block, the soup is Σ α θ_j, and training lowers the
/// held-out loss below the uniform soup's.
#[test]
fn learned_soup_trains_coefficients_on_the_simplex() {
    let store = zoo(6, 21, DType::F64);
    let mut obj = objective(60, 20, 21, DType::F64);
    let uniform_loss = obj
        .evaluate(&uniform_soup(&store, RunOptions::default()).unwrap().soup)
        .unwrap()
        .loss;
    for (config, blocks) in [
        (LearnedConfig::learned(), 1),
        (LearnedConfig::learned_plus(), 4),
    ] {
        let result = learned_soup(&store, &mut obj, &config, RunOptions::default()).unwrap();
        assert_eq!(result.alpha.len(), blocks);
        for row in &result.alpha {
            assert!(row.iter().all(|&a| a >= 0.0));
            assert!((row.iter().sum::<f64>() - 1.0).abs() <= 1e-12);
        }
        let soup =
            host_blocks(&soup_core::to_blocks(&result.soup, &result.blocks).unwrap()).unwrap();
        let naive = soup_from_alpha(&store, &result.blocks, &result.alpha).unwrap();
        for (s, r) in soup.iter().zip(&naive) {
            assert!(rel_err(s, r) <= 1e-12);
        }
        let loss = obj.evaluate(&result.soup).unwrap().loss;
        assert!(
            loss < uniform_loss,
            "{}: {loss} ≥ uniform {uniform_loss}",
            result.method
        );
        assert_eq!(result.history.len(), 5 * 3);
        assert_eq!(result.evaluations.len(), 5);
        assert_eq!(result.blocks.len(), blocks);
        assert_eq!(config.block_cut == BlockCut::WHOLE, blocks == 1);
    }
}

/// The reference: α = softmax(a) and θ = Σ α θ_i built inside candle's autograd graph, with the
/// loss differentiated with respect to a and the temperature directly.
fn autograd_reference(
    obj: &mut verify::MlpObjective,
    stacks: &[Tensor],
    blocks: &[soup_core::Block],
    layout: &soup_core::ParamLayout,
    coef: &[f64],
    batch: soup_core::Batch,
) -> Vec<f64> {
    use candle_core::{Var, D};
    let n = stacks[0].dim(0).unwrap();
    let l = blocks.len();
    let a = Var::from_tensor(
        &Tensor::from_slice(&coef[..l * n], (l, n), &candle_core::Device::Cpu).unwrap(),
    )
    .unwrap();
    let t =
        Var::from_tensor(&Tensor::new(coef[l * n], &candle_core::Device::Cpu).unwrap()).unwrap();
    let e = a
        .as_tensor()
        .broadcast_sub(&a.as_tensor().max_keepdim(D::Minus1).unwrap().detach())
        .unwrap()
        .exp()
        .unwrap();
    let alpha = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    let mut theta = Vec::new();
    for (bi, block) in blocks.iter().enumerate() {
        for ti in block.tensors.clone() {
            let row = alpha.narrow(0, bi, 1).unwrap();
            theta.push(
                row.matmul(&stacks[ti])
                    .unwrap()
                    .reshape(layout.tensors[ti].shape.as_slice())
                    .unwrap(),
            );
        }
    }
    let loss = obj.loss(&theta, Some(t.as_tensor()), batch).unwrap();
    let grads = loss.backward().unwrap();
    let mut g = grads
        .get(a.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    g.push(
        grads
            .get(t.as_tensor())
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
    );
    g
}

// Learned-Soup's coefficient gradient (formed outside the autograd graph) equals autograd through
// the mixing and central finite differences of the loss.
proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn learned_soup_gradient_matches_autograd_and_finite_differences(
        n in 2usize..6, plus in any::<bool>(), seed in any::<u64>(),
    ) {
        let store = zoo(n, seed, DType::F64);
        let mut obj = objective(24, 8, seed, DType::F64);
        let z = soup_core::zoo::Zoo::open(&store).unwrap();
        let layout = z.layout.clone();
        let cut = if plus { BlockCut::PER_TENSOR } else { BlockCut::WHOLE };
        let blocks = cut.blocks(&layout).unwrap();
        let stacks = soup_core::stack_models(&z, &layout).unwrap();
        let mut rng = soup_core::rng::SplitMix64::new(seed);
        let mut coef: Vec<f64> = rng.normals(blocks.len() * n + 1);
        coef[blocks.len() * n] = 1.0 + coef[blocks.len() * n].abs();
        let batch = soup_core::Batch { epoch_seed: seed, index: 1 };
        let (_, g) = soup_core::learned_loss_and_grad(&mut obj, &stacks, &blocks, &layout, &coef, batch).unwrap();
        let reference = autograd_reference(&mut obj, &stacks, &blocks, &layout, &coef, batch);
        prop_assert!(rel_err(&g, &reference) <= 1e-10, "autograd: {}", rel_err(&g, &reference));
        let h = 1e-5;
        let fd: Vec<f64> = (0..coef.len()).map(|k| {
            let mut up = coef.clone();
            up[k] += h;
            let mut down = coef.clone();
            down[k] -= h;
            let f = |c: &[f64], o: &mut verify::MlpObjective| soup_core::learned_loss_and_grad(o, &stacks, &blocks, &layout, c, batch).unwrap().0;
            (f(&up, &mut obj) - f(&down, &mut obj)) / (2.0 * h)
        }).collect();
        prop_assert!(rel_err(&g, &fd) <= 1e-6, "finite differences: {}", rel_err(&g, &fd));
    }
}
