//! Bad input gets a typed error naming the culprit, never a panic.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{config, objective, zoo, ARCH};
use soup_core::RunOptions;
use soup_core::{
    greedy_soup, learned_soup, run_mehl, uniform_soup, BlockCut, GreedyAccept, LearnedConfig,
    MehlConfig, SoupError, StepSchedule,
};
use verify::MemoryStore;

#[test]
fn empty_zoo() {
    let store = MemoryStore::new(ARCH.layout(), vec![]);
    let mut obj = objective(8, 8, 1, DType::F64);
    let cfg = config(2, BlockCut::WHOLE, 1, 1);
    assert!(matches!(
        run_mehl(&store, &mut obj, &cfg, RunOptions::default()),
        Err(SoupError::EmptyZoo)
    ));
    assert!(matches!(
        uniform_soup(&store, RunOptions::default()),
        Err(SoupError::EmptyZoo)
    ));
    assert!(matches!(
        greedy_soup(
            &store,
            &mut obj,
            GreedyAccept::Improves,
            RunOptions::default()
        ),
        Err(SoupError::EmptyZoo)
    ));
    assert!(matches!(
        learned_soup(
            &store,
            &mut obj,
            &LearnedConfig::learned(),
            RunOptions::default()
        ),
        Err(SoupError::EmptyZoo)
    ));
}

#[test]
fn bad_knobs_are_named() {
    let store = zoo(3, 1, DType::F64);
    let mut obj = objective(8, 8, 1, DType::F64);
    let bad = [
        (
            MehlConfig {
                model_batch: 0,
                ..config(2, BlockCut::WHOLE, 1, 1)
            },
            "model_batch",
        ),
        (
            MehlConfig {
                inner_epochs: 0,
                ..config(2, BlockCut::WHOLE, 1, 1)
            },
            "inner_epochs",
        ),
        (
            MehlConfig {
                outer_passes: 0,
                ..config(2, BlockCut::WHOLE, 1, 1)
            },
            "outer_passes",
        ),
        (
            MehlConfig {
                lr: f64::NAN,
                ..config(2, BlockCut::WHOLE, 1, 1)
            },
            "lr",
        ),
        (
            MehlConfig {
                weight_decay: -1.0,
                ..config(2, BlockCut::WHOLE, 1, 1)
            },
            "weight_decay",
        ),
        (
            MehlConfig {
                clip_grad_norm: Some(0.0),
                ..config(2, BlockCut::WHOLE, 1, 1)
            },
            "clip_grad_norm",
        ),
        (
            MehlConfig {
                schedule: StepSchedule::WarmupCosine {
                    warmup_fraction: 1.0,
                },
                ..config(2, BlockCut::WHOLE, 1, 1)
            },
            "warmup_fraction",
        ),
    ];
    for (cfg, name) in bad {
        let err = run_mehl(&store, &mut obj, &cfg, RunOptions::default()).unwrap_err();
        assert!(
            matches!(err, SoupError::InvalidConfig { name: n, .. } if n == name),
            "{err}"
        );
        assert!(err.to_string().contains(name));
    }
    let learned = LearnedConfig {
        epochs: 0,
        ..LearnedConfig::learned()
    };
    assert!(
        learned_soup(&store, &mut obj, &learned, RunOptions::default())
            .unwrap_err()
            .to_string()
            .contains("epochs")
    );
}

#[test]
fn mismatched_models_name_model_and_tensor() {
    let mut store = zoo(3, 1, DType::F64);
    // Model 2 has a head for 4 classes.
    store.models[2][3] = Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap();
    store.layouts[2].tensors[3].shape = vec![4];
    let mut obj = objective(8, 8, 1, DType::F64);
    let cfg = config(3, BlockCut::WHOLE, 1, 1);
    for err in [
        run_mehl(&store, &mut obj, &cfg, RunOptions::default()).unwrap_err(),
        uniform_soup(&store, RunOptions::default()).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(
            msg.contains("model-2") && msg.contains("head.bias"),
            "{msg}"
        );
    }
    // A store whose tensors disagree with the layout it announced is caught too.
    let mut store = zoo(2, 1, DType::F64);
    store.models[1].pop();
    let msg = uniform_soup(&store, RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("model-1") && msg.contains("head.bias"),
        "{msg}"
    );
}

#[test]
fn non_finite_loss_names_step_and_model_batch() {
    let store = zoo(4, 1, DType::F64);
    let mut obj = objective(16, 8, 1, DType::F64);
    obj.data.x = (obj.data.x.clone() * f64::NAN).unwrap();
    let err = run_mehl(
        &store,
        &mut obj,
        &config(2, BlockCut::WHOLE, 1, 1),
        RunOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            SoupError::NonFinite {
                what: "loss",
                step: 0,
                model_batch: 0
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "non-finite loss at step 0 of model batch 0"
    );
}

/// f64 models take candle's ops to their directions, f32 ones the fused CPU kernel
/// (`kernels::direction_row`): both name the model and the block.
#[test]
fn non_finite_model_is_named() {
    for dtype in [DType::F64, DType::F32] {
        let mut store = zoo(3, 1, dtype);
        store.models[1][0] = store.models[1][0].affine(f64::INFINITY, 0.0).unwrap();
        let mut obj = objective(8, 8, 1, dtype);
        let cfg = MehlConfig {
            model_batch: 1,
            ..config(1, BlockCut::PER_TENSOR, 1, 1)
        };
        let err = run_mehl(&store, &mut obj, &cfg, RunOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("model-1") && msg.contains("layers.0.weight"),
            "{dtype:?}: {msg}"
        );
    }
}
