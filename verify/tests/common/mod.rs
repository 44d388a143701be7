//! Shared set-up of the verify tests.
#![allow(dead_code)]

use candle_core::DType;
use soup_core::{BlockCut, MehlConfig, OptimizerKind, StepSchedule};
use verify::{Data, MemoryStore, Mlp, MlpObjective};

pub const ARCH: Mlp = Mlp {
    input: 5,
    hidden: 6,
    classes: 3,
};

/// The block cuts the tests draw from: one block, per tensor, by layer, and a size in between.
pub fn cut(k: usize) -> BlockCut {
    match k % 4 {
        0 => BlockCut::WHOLE,
        1 => BlockCut::PER_TENSOR,
        2 => BlockCut::PerLayer {
            marker: "layers.".into(),
        },
        _ => BlockCut::LayerSize(20),
    }
}

pub fn zoo(n: usize, seed: u64, dtype: DType) -> MemoryStore {
    MemoryStore::mlp_zoo(ARCH, n, seed, dtype, &[]).unwrap()
}

pub fn objective(examples: usize, batch_size: usize, seed: u64, dtype: DType) -> MlpObjective {
    MlpObjective {
        arch: ARCH,
        data: Data::clusters(ARCH, examples, 3.0, seed ^ 0x5eed, dtype).unwrap(),
        batch_size,
        shard: (0, 1),
    }
}

/// A short MEHL run: b models per batch, 2 inner epochs, AdamW, warm-up + cosine, clipping.
pub fn config(b: usize, cut: BlockCut, outer_passes: usize, seed: u64) -> MehlConfig {
    MehlConfig {
        model_batch: b,
        outer_passes,
        inner_epochs: 2,
        lr: 0.05,
        weight_decay: 0.01,
        optimizer: OptimizerKind::ADAMW,
        schedule: StepSchedule::default(),
        clip_grad_norm: Some(1.0),
        block_cut: cut,
        frozen_tensors: Vec::new(),
        seed,
        evaluate_each_model_batch: false,
        direction_dtype: None,
        directions: soup_core::Directions::Unit,
        task_vectors: None,
    }
}
