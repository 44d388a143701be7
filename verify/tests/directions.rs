//! MEHL with its directions stored in bf16 or f16 beside f32 models (`direction_dtype`): half the
//! direction memory; the soup returned is Σ α_j θ_j recomputed from the models, and α stays close
//! to the f32 run's.

mod common;

use candle_core::DType;
use common::{config, objective, zoo, ARCH};
use proptest::prelude::*;
use soup_core::{run_mehl, to_blocks, BlockCut, Event, MehlConfig, RunOptions, SoupResult};
use verify::{host_blocks, rel_err, soup_from_alpha, MemoryStore};

fn run(store: &MemoryStore, cfg: &MehlConfig, seed: u64) -> SoupResult {
    let mut obj = objective(32, 8, seed, DType::F32);
    run_mehl(store, &mut obj, cfg, RunOptions::default()).unwrap()
}

/// The bits of an f32 soup, in layout order.
fn bits(r: &SoupResult) -> Vec<u32> {
    r.soup
        .iter()
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .map(f32::to_bits)
        .collect()
}

fn with_directions(cfg: MehlConfig, dtype: DType) -> MehlConfig {
    MehlConfig {
        direction_dtype: Some(dtype),
        ..cfg
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn half_directions_return_the_soup_of_their_alpha(
        n in 2usize..7, b in 1usize..5, whole in any::<bool>(), half in any::<bool>(), seed in any::<u64>(),
    ) {
        let dtype = if half { DType::F16 } else { DType::BF16 };
        let cut = if whole { BlockCut::WHOLE } else { BlockCut::PER_TENSOR };
        let store = zoo(n, seed, DType::F32);
        let base = config(b, cut, 2, seed);
        let full = run(&store, &base, seed);
        let reduced = run(&store, &with_directions(base, dtype), seed);
        // The soup is Σ α θ_j to f32 rounding (θ of the last step, built from rounded
        // directions, is not: it differs by Σ X (d̃ − d), about 2^-9 of the displacement).
        let soup = host_blocks(&to_blocks(&reduced.soup, &reduced.blocks).unwrap()).unwrap();
        let naive = soup_from_alpha(&store, &reduced.blocks, &reduced.alpha).unwrap();
        for (t, r) in soup.iter().zip(&naive) {
            prop_assert!(rel_err(t, r) <= 2e-6, "soup ≠ Σ α θ_j: {}", rel_err(t, r));
        }
        for row in &reduced.alpha {
            prop_assert!((row.iter().sum::<f64>() - 1.0).abs() <= 1e-5);
        }
        // The directions take half the bytes.
        let bk = b.min(n);
        prop_assert_eq!(full.memory.directions, bk * ARCH.layout().numel() * 4);
        prop_assert_eq!(reduced.memory.directions, bk * ARCH.layout().numel() * 2);
        prop_assert!(reduced.memory.tensor_bytes() < full.memory.tensor_bytes());
    }
}

/// On fixed zoos, the bf16 soup's held-out loss and its α follow the f32 run's. (Not an invariant:
/// AdamW normalises each step, so where a block's gradient is tiny the rounding of the directions
/// can turn its steps; the soup's loss is what must not move.)
#[test]
fn half_directions_keep_the_soups_loss() {
    use soup_core::Objective;
    let (mut worst_loss, mut worst_alpha): (f64, f64) = (0.0, 0.0);
    for seed in 0..8 {
        let store = zoo(5, seed, DType::F32);
        let base = config(3, BlockCut::PER_TENSOR, 2, seed);
        let full = run(&store, &base, seed);
        let reduced = run(&store, &with_directions(base, DType::BF16), seed);
        let mut obj = objective(32, 8, seed, DType::F32);
        let (lf, lr) = (
            obj.evaluate(&full.soup).unwrap().loss,
            obj.evaluate(&reduced.soup).unwrap().loss,
        );
        worst_loss = worst_loss.max((lr - lf).abs() / lf);
        for (a, e) in reduced
            .alpha
            .iter()
            .flatten()
            .zip(full.alpha.iter().flatten())
        {
            worst_alpha = worst_alpha.max((a - e).abs());
        }
    }
    eprintln!("bf16 vs f32 directions: loss {worst_loss:.2e} relative, α {worst_alpha:.3e}");
    assert!(
        worst_loss <= 1e-2,
        "held-out loss moved by {worst_loss:.2e} relative"
    );
    assert!(worst_alpha <= 0.1, "α moved by {worst_alpha}");
}

/// During the run, θ = c + Σ X d̃ stays within bf16 rounding of the soup its α describe.
#[test]
fn theta_of_every_step_is_its_alpha_soup_within_bf16_rounding() {
    let store = zoo(6, 9, DType::F32);
    let mut obj = objective(32, 8, 9, DType::F32);
    let cfg = with_directions(config(3, BlockCut::PER_TENSOR, 2, 9), DType::BF16);
    let mut worst: f64 = 0.0;
    let mut steps = 0;
    run_mehl(
        &store,
        &mut obj,
        &cfg,
        RunOptions::new(&mut |e| {
            if let Event::Step { hyperplane: hp, .. } = e {
                let theta = host_blocks(&hp.theta_blocks().unwrap()).unwrap();
                let naive = soup_from_alpha(&store, &hp.blocks, &hp.alpha()).unwrap();
                for (t, r) in theta.iter().zip(&naive) {
                    worst = worst.max(rel_err(t, r));
                }
                steps += 1;
            }
        }),
    )
    .unwrap();
    assert!(steps > 0);
    // bf16 keeps 8 significant bits: each direction element is off by at most 2^-9 relative.
    assert!(worst <= 2f64.powi(-8), "θ vs Σ α θ_j: {worst}");
}

/// Same seed ⇒ the same soup, bit for bit, with half directions too; and a run over two
/// processes (threads) ends with the one-process soup and α.
#[test]
fn half_directions_are_deterministic_and_shard_over_processes() {
    let cfg = with_directions(config(4, BlockCut::PER_TENSOR, 2, 5), DType::BF16);
    let store = zoo(7, 5, DType::F32);
    let single = run(&store, &cfg, 5);
    assert_eq!(bits(&single), bits(&run(&store, &cfg, 5)));
    let results = verify::ThreadCollective::run(2, |comm| {
        let store = zoo(7, 5, DType::F32);
        let mut obj = objective(32, 8, 5, DType::F32);
        run_mehl(&store, &mut obj, &cfg, RunOptions::default().on(comm)).unwrap()
    });
    let flat = |r: &SoupResult| {
        host_blocks(&to_blocks(&r.soup, &r.blocks).unwrap())
            .unwrap()
            .concat()
    };
    for r in &results {
        assert!(rel_err(&flat(r), &flat(&single)) <= 1e-5);
        for (a, e) in r.alpha.iter().flatten().zip(single.alpha.iter().flatten()) {
            assert!((a - e).abs() <= 1e-4 * (1.0 + e.abs()), "α {a} vs {e}");
        }
    }
}

/// A bf16 run stopped after a model batch and resumed from its progress ends with the same soup
/// and α, bit for bit.
#[test]
fn a_resumed_half_direction_run_equals_the_uninterrupted_one() {
    let store = zoo(7, 12, DType::F32);
    let cfg = with_directions(config(3, BlockCut::PER_TENSOR, 2, 12), DType::BF16);
    let mut obj = objective(32, 8, 12, DType::F32);
    let mut saved = Vec::new();
    let full = run_mehl(
        &store,
        &mut obj,
        &cfg,
        RunOptions::new(&mut |e| {
            if let Event::BatchEnd { progress, .. } = e {
                saved.push((*progress).clone());
            }
        }),
    )
    .unwrap();
    assert!(saved.len() > 2);
    let resumed = run_mehl(
        &store,
        &mut obj,
        &cfg,
        RunOptions::default().resume(Some(saved[2].clone())),
    )
    .unwrap();
    assert_eq!(bits(&full), bits(&resumed));
    assert_eq!(full.alpha, resumed.alpha);
}
