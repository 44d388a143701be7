//! The multi-task objective and encoder store (spec §3.9) against naive references: entropy,
//! the assembly of a task's model from the shared encoder and its own head, the heads of every
//! family, and the checks of the encoder store.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use soup_core::{Batch, Objective};
use soup_models::arch::mlp::{Mlp, MlpConfig};
use soup_models::checkpoint::write_model_dir;
use soup_models::testkit::fixtures::{bits, ScratchDir};
use soup_models::train::multitask::{
    encoder_layout, mean_entropy, EncoderStore, MultiTask, Task, TaskLoss,
};
use soup_models::{Architecture, Classification, Dataset};

fn mlp(hidden: usize, classes: usize) -> Arc<dyn Architecture> {
    Arc::new(
        Mlp::new(MlpConfig {
            input: [1, 4, 4],
            hidden: vec![hidden],
            num_classes: classes,
        })
        .unwrap(),
    )
}

fn data(n: usize, classes: usize, seed: u64) -> Dataset {
    let mut rng = soup_core::rng::SplitMix64::new(seed);
    let x = Tensor::from_vec(rng.normals(n * 16), (n, 1, 4, 4), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let labels = (0..n).map(|i| (i % classes) as u32).collect();
    Dataset::in_memory(x, labels)
}

#[test]
fn mean_entropy_is_minus_sum_p_log_p_averaged_over_rows() {
    let rows = [[0.3f64, -1.0, 2.0], [0.0, 0.0, 0.0], [10.0, -10.0, 0.5]];
    let logits = Tensor::new(&rows, &Device::Cpu).unwrap();
    let got = mean_entropy(&logits).unwrap().to_scalar::<f64>().unwrap();
    let want = rows
        .iter()
        .map(|r| {
            let z: f64 = r.iter().map(|v| v.exp()).sum();
            -r.iter()
                .map(|v| {
                    let p = v.exp() / z;
                    p * p.ln()
                })
                .sum::<f64>()
        })
        .sum::<f64>()
        / 3.0;
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    // Uniform logits: log C.
    let uniform = Tensor::zeros((2, 5), DType::F64, &Device::Cpu).unwrap();
    let e = mean_entropy(&uniform).unwrap().to_scalar::<f64>().unwrap();
    assert!((e - 5f64.ln()).abs() < 1e-12);
}

#[test]
fn every_family_names_its_classification_head() {
    let clip = soup_models::build("clip-vit-b32", &serde_json::json!({"num_classes": 3})).unwrap();
    assert_eq!(
        clip.head_tensors(),
        ["classification_head.weight", "classification_head.bias"]
    );
    assert_eq!(
        mlp(6, 3).head_tensors(),
        ["classification_head.weight", "classification_head.bias"]
    );
    let full = soup_models::arch::dinov2::Dinov2Classifier::new(
        soup_models::arch::dinov2::Dinov2Config::small(56, 3),
    )
    .unwrap();
    assert_eq!(
        full.head_tensors(),
        ["classifier.weight", "classifier.bias"]
    );
    assert_eq!(encoder_layout(&full).len(), 222);
}

/// Two MLP checkpoints with heads of 3 and 5 classes over one encoder, and a base.
fn store(dir: &ScratchDir) -> (EncoderStore, Vec<Vec<Tensor>>) {
    let archs = [mlp(6, 4), mlp(6, 3), mlp(6, 5)];
    let mut models = Vec::new();
    let mut params = Vec::new();
    for (i, arch) in archs.iter().enumerate() {
        let p = arch.init(i as u64, &Device::Cpu).unwrap();
        let path = dir.path().join(format!("m{i}"));
        write_model_dir(&path, arch.as_ref(), &p, &Default::default(), "").unwrap();
        models.push((path, arch.clone()));
        params.push(p);
    }
    (EncoderStore::new(models, &Device::Cpu).unwrap(), params)
}

#[test]
fn the_encoder_store_hands_out_encoders_and_heads() {
    use soup_core::ModelStore;
    let dir = ScratchDir::new("encoders");
    let (store, params) = store(&dir);
    assert_eq!(store.len(), 3);
    for (i, p) in params.iter().enumerate() {
        assert_eq!(store.layout(i).unwrap(), store.encoder);
        let enc = store.load(i).unwrap();
        assert_eq!(bits(&enc), bits(&p[..2]), "model {i}");
        assert_eq!(bits(&store.head(i).unwrap()), bits(&p[2..]));
    }
    // A model whose encoder differs is refused, by name.
    let other = mlp(7, 3);
    let p = other.init(9, &Device::Cpu).unwrap();
    let path = dir.path().join("other");
    write_model_dir(&path, other.as_ref(), &p, &Default::default(), "").unwrap();
    let first = dir.path().join("m0");
    let err = EncoderStore::new(vec![(first, mlp(6, 4)), (path, other)], &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("layers.0.weight"), "{err}");
}

#[test]
fn the_multitask_loss_is_the_sum_of_each_tasks_loss_with_its_own_head() {
    let dir = ScratchDir::new("multitask-loss");
    let (store, params) = store(&dir);
    let tasks: Vec<Task> = [1usize, 2]
        .iter()
        .map(|&i| Task {
            name: format!("task{i}"),
            classification: Classification::new(
                store.models[i].arch.clone(),
                data(10 + 7 * i, store.models[i].arch.num_classes(), i as u64),
                4,
            ),
            head: store.head(i).unwrap(),
        })
        .collect();
    let encoder = params[0][..2].to_vec();
    for loss in [TaskLoss::CrossEntropy, TaskLoss::Entropy] {
        let mut mt = MultiTask {
            encoder: store.encoder.clone(),
            tasks: tasks.clone(),
            loss,
        };
        // The largest task's batches: 24 examples in batches of 4.
        assert_eq!(mt.num_batches(), 6);
        for index in [0, 3, 5] {
            let batch = Batch {
                epoch_seed: 7,
                index,
            };
            let got = mt
                .loss(&encoder, None, batch)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let mut want = 0.0f32;
            for (k, &i) in [1usize, 2].iter().enumerate() {
                let full: Vec<Tensor> = encoder.iter().chain(&params[i][2..]).cloned().collect();
                assert_eq!(bits(&mt.task_params(k, &encoder).unwrap()), bits(&full));
                // The task's rows: its own permutation, cycled.
                let c = &tasks[k].classification;
                let own = c.num_batches();
                let rows = c.batch_rows(Batch {
                    epoch_seed: soup_core::rng::derive_seed(7, &[k as u64, (index / own) as u64]),
                    index: index % own,
                });
                let (logits, labels) = c.logits(&full, &rows).unwrap();
                let l = match loss {
                    TaskLoss::CrossEntropy => {
                        soup_models::ops::cross_entropy(&logits, &labels, 0.0).unwrap()
                    }
                    TaskLoss::Entropy => mean_entropy(&logits).unwrap(),
                };
                want += l.to_scalar::<f32>().unwrap();
            }
            assert!(
                (got - want).abs() <= 1e-6 * want.abs(),
                "{loss:?}: {got} vs {want}"
            );
        }
        // Per-task evaluation is each task's own classification of its full model.
        let per_task = mt.evaluate_tasks(&encoder).unwrap();
        for (k, &i) in [1usize, 2].iter().enumerate() {
            let full: Vec<Tensor> = encoder.iter().chain(&params[i][2..]).cloned().collect();
            let mut c = tasks[k].classification.clone();
            assert_eq!(per_task[k], c.evaluate(&full).unwrap());
        }
        let m = mt.evaluate(&encoder).unwrap();
        let mean = per_task.iter().map(|m| m.accuracy.unwrap()).sum::<f64>() / 2.0;
        assert_eq!(m.accuracy, Some(mean));
        assert_eq!(m.count, per_task[0].count + per_task[1].count);
    }
}
