//! The device-portable path of MEHL (`RunOptions::portable`): θ = c + Σ X d, the projection
//! ⟨∇θ, d_i⟩ and ‖∇θ‖ as candle ops on the tensors' device, which is what runs on a GPU. Run here
//! on the CPU, it must give the fused kernels' results up to the order of floating-point sums,
//! and each coefficient step must copy a fixed, small number of things between the host and the
//! device (`soup_core::transfer`), however many tensors and blocks the model has.

mod common;

use candle_core::DType;
use common::{config, cut, objective, zoo};
use proptest::prelude::*;
use soup_core::{run_mehl, to_blocks, BlockCut, Event, MehlConfig, RunOptions, SoupResult};
use verify::{host_blocks, rel_err, MemoryStore};

fn run(
    store: &MemoryStore,
    cfg: &MehlConfig,
    seed: u64,
    dtype: DType,
    portable: bool,
) -> SoupResult {
    let mut obj = objective(24, 8, seed, dtype);
    run_mehl(
        store,
        &mut obj,
        cfg,
        RunOptions::default().portable(portable),
    )
    .unwrap()
}

fn flat(r: &SoupResult) -> Vec<f64> {
    host_blocks(&to_blocks(&r.soup, &r.blocks).unwrap())
        .unwrap()
        .concat()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn the_portable_path_gives_the_fused_kernels_results(
        n in 2usize..7, b in 1usize..5, k in 0usize..4, half in any::<bool>(), seed in any::<u64>(),
    ) {
        // f64 models and directions: agreement to rounding of the sums' order.
        let cfg = config(b, cut(k), 2, seed);
        let store = zoo(n, seed, DType::F64);
        let (fused, portable) = (
            run(&store, &cfg, seed, DType::F64, false),
            run(&store, &cfg, seed, DType::F64, true),
        );
        prop_assert!(rel_err(&flat(&fused), &flat(&portable)) <= 1e-9);
        for (a, e) in portable.alpha.iter().flatten().zip(fused.alpha.iter().flatten()) {
            prop_assert!((a - e).abs() <= 1e-9 * (1.0 + e.abs()), "α {} vs {}", a, e);
        }
        prop_assert_eq!(portable.history.len(), fused.history.len());
        for (p, f) in portable.history.iter().zip(&fused.history) {
            prop_assert!((p.loss - f.loss).abs() <= 1e-9 * (1.0 + f.loss.abs()));
        }
        // f32 models with f32, bf16 or f16 directions: the soup is recomputed from α on both
        // paths; the losses agree to f32 rounding.
        let dtype = match (k % 3, half) {
            (0, _) => None,
            (_, true) => Some(DType::F16),
            (_, false) => Some(DType::BF16),
        };
        let cfg = MehlConfig { direction_dtype: dtype, ..cfg };
        let store = zoo(n, seed, DType::F32);
        let (fused, portable) = (
            run(&store, &cfg, seed, DType::F32, false),
            run(&store, &cfg, seed, DType::F32, true),
        );
        for (p, f) in portable.history.iter().zip(&fused.history) {
            prop_assert!((p.loss - f.loss).abs() <= 1e-4 * (1.0 + f.loss.abs()), "loss {} vs {}", p.loss, f.loss);
        }
        prop_assert!(rel_err(&flat(&fused), &flat(&portable)) <= 1e-3);
    }
}

/// Transfers between consecutive steps of one model batch, over a whole run.
fn transfers_per_step(cut: BlockCut, portable: bool) -> (Vec<u64>, usize) {
    let store = zoo(5, 3, DType::F32);
    let cfg = config(3, cut, 1, 3);
    let mut obj = objective(24, 8, 3, DType::F32);
    let (mut last, mut per_step) = (None, Vec::new());
    let mut blocks = 0;
    let mut observer = |e: &Event| match e {
        Event::BatchStart { hyperplane, .. } => {
            last = None;
            blocks = hyperplane.num_blocks();
        }
        Event::Step { .. } => {
            let now = soup_core::transfer::count();
            if let Some(before) = last {
                per_step.push(now - before);
            }
            last = Some(now);
        }
        Event::BatchEnd { .. } | Event::LearnedStep { .. } => {}
    };
    let options = RunOptions::new(&mut observer).portable(portable);
    run_mehl(&store, &mut obj, &cfg, options).unwrap();
    (per_step, blocks)
}

#[test]
fn a_step_makes_four_transfers_whatever_the_number_of_tensors() {
    // The MLP has 4 tensors: one block, or one per tensor.
    for cut in [BlockCut::WHOLE, BlockCut::PER_TENSOR] {
        let (portable, blocks) = transfers_per_step(cut.clone(), true);
        assert!(!portable.is_empty());
        // The loss, ‖∇θ‖, the b × L projection back; X (b × L) out.
        assert!(
            portable.iter().all(|&t| t == 4),
            "{cut:?} ({blocks} blocks): {portable:?}"
        );
        // On the CPU the fused kernels read the tensors in place: only the loss is copied.
        let (fused, _) = transfers_per_step(cut.clone(), false);
        assert!(fused.iter().all(|&t| t == 1), "{cut:?}: {fused:?}");
    }
    assert_eq!(transfers_per_step(BlockCut::PER_TENSOR, true).1, 4);
}

/// Over two processes (thread ranks), the portable path gives the one-process fused run.
#[test]
fn the_portable_path_shards_over_processes() {
    let cfg = config(4, BlockCut::PER_TENSOR, 2, 9);
    let single = run(&zoo(6, 9, DType::F64), &cfg, 9, DType::F64, false);
    let results = verify::ThreadCollective::run(2, |comm| {
        let store = zoo(6, 9, DType::F64);
        let mut obj = objective(24, 8, 9, DType::F64);
        let mut quiet = |_: &Event| {};
        let options = RunOptions::new(&mut quiet).on(comm).portable(true);
        run_mehl(&store, &mut obj, &cfg, options).unwrap()
    });
    for r in &results {
        assert!(rel_err(&flat(r), &flat(&single)) <= 1e-9);
    }
}
