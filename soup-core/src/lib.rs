//! soup-core: learned model soups on a hyperplane (MEHL-Soup, ECCV 2024) and their baselines,
//! over abstract parameter blocks.
//!
//! The crate knows nothing of CLIP, files or networks: models come from a [`ModelStore`], the
//! loss and its gradient from an [`Objective`], communication between processes from a
//! [`Collective`]. Tensors are `candle_core::Tensor` on any device. Section numbers (§) refer to
//! `docs/MEHL-SOUP.md`.

#![warn(missing_docs)]

pub mod baselines;
pub mod data_free;
pub mod error;
pub mod hyperplane;
pub mod kernels;
pub mod layout;
pub mod mehl;
pub mod merging;
pub mod method;
pub mod optim;
pub mod options;
pub mod result;
pub mod rng;
pub mod schedule;
pub mod traits;
pub mod transfer;
pub mod zoo;

pub use baselines::{
    greedy_soup, learned_loss_and_grad, learned_soup, stack_models, uniform_soup, GreedyAccept,
    LearnedConfig,
};
pub use data_free::{
    data_free_merge, merge_tensor, Arithmetic, BaseRule, DataFreeMethod, InputParams,
    KeepProbability, MaskSource, ParamInfo, Scope, SeededMasks, SharedParams, TensorParams,
};
pub use error::{Result, SoupError};
pub use hyperplane::{Base, Directions, Hyperplane};
pub use layout::{from_blocks, frozen_blocks, to_blocks, Block, BlockCut, ParamLayout, TensorSpec};
pub use mehl::{epoch_seed, run_mehl, share, Event, MehlConfig, MehlProgress, TaskVectors};
pub use merging::{scaled_merge, task_arithmetic, ties_merging, MergedTaskVector};
pub use method::{DataUse, Kind, MergeMethod, Method, MethodInfo, SoupMethod, REGISTRY};
pub use optim::{clip_global_norm, global_norm, global_norm_portable, Optimizer, OptimizerKind};
pub use options::RunOptions;
pub use result::{BatchEval, MemoryAccount, SoupResult, StepRecord, Timings};
pub use schedule::StepSchedule;
/// The README's library example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

pub use traits::{
    autograd_loss_and_grad, Batch, Collective, Metrics, ModelStore, Objective, Rank, SingleProcess,
};
