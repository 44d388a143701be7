//! Fine-tuning learns, is reproducible, and augments as documented; soups of fine-tuned
//! checkpoints on disk run end to end through soup-core.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use soup_core::rng::SplitMix64;
use soup_core::RunOptions;
use soup_core::{run_mehl, BlockCut, MehlConfig, Objective};
use soup_models::arch::clip::ClipClassifier;
use soup_models::checkpoint::write_model_dir;
use soup_models::testkit::fixtures::{bits, tensor_bits as flat, tiny_clip_config, ScratchDir};
use soup_models::train::finetune::{augment, finetune, finetune_some, Augment, FinetuneConfig};
use soup_models::{Architecture, Checkpoint, Classification, Dataset, FileStore};

/// 1-channel 16×16 images by texture, at a random phase, plus noise: horizontal stripes,
/// vertical stripes, a checkerboard, or nothing.
fn quadrants(n: usize, seed: u64) -> Dataset {
    let mut rng = SplitMix64::new(seed);
    let mut pixels = Vec::with_capacity(n * 256);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let k = i % 4;
        labels.push(k as u32);
        let phase = rng.below(4);
        let noise = rng.normals(256);
        for (p, e) in noise.iter().enumerate() {
            let (y, x) = (p / 16 + phase, p % 16 + phase);
            let on = match k {
                0 => y % 4 < 2,
                1 => x % 4 < 2,
                2 => (x / 2 + y / 2) % 2 == 0,
                _ => false,
            };
            pixels.push(if on { 1.0 } else { 0.0 } + 0.3 * *e as f32);
        }
    }
    Dataset {
        images: soup_models::Images::Memory(
            Tensor::from_vec(pixels, (n, 1, 16, 16), &Device::Cpu).unwrap(),
        ),
        labels,
        classes: None,
    }
}

fn config(seed: u64, lr: f64) -> FinetuneConfig {
    FinetuneConfig {
        epochs: 4,
        batch_size: 16,
        lr,
        weight_decay: 0.01,
        warmup_fraction: 0.1,
        label_smoothing: 0.1,
        augment: Augment {
            crop_padding: 1,
            horizontal_flip: false,
            noise_std: 0.05,
        },
        clip_grad_norm: Some(1.0),
        seed,
    }
}

fn objective(arch: &ClipClassifier, data: Dataset) -> Classification {
    Classification {
        eval_batch_size: 64,
        ..Classification::new(
            std::sync::Arc::new(ClipClassifier::new(arch.config.clone()).unwrap()),
            data,
            16,
        )
    }
}

#[test]
fn a_frozen_tensor_is_left_bit_for_bit_and_the_rest_learns() {
    // A linear probe: the head trains, the backbone does not move.
    let arch = ClipClassifier::new(tiny_clip_config(1, 4)).unwrap();
    let init = arch.init(1, &Device::Cpu).unwrap();
    let head: Vec<bool> = arch
        .layout()
        .tensors
        .iter()
        .map(|t| t.name.starts_with("classification_head."))
        .collect();
    let train = quadrants(64, 1);
    let (probe, history) =
        finetune_some(&arch, &init, &head, &train, &config(1, 0.05), &mut |_| {}).unwrap();
    for ((spec, before), (after, &trains)) in arch
        .layout()
        .tensors
        .iter()
        .zip(&init)
        .zip(probe.iter().zip(&head))
    {
        let same = flat(before) == flat(after);
        assert_eq!(
            same, !trains,
            "{}: trained {}, changed {}",
            spec.name, trains, !same
        );
    }
    let first = history[..4].iter().map(|s| s.loss).sum::<f64>();
    let last = history[history.len() - 4..]
        .iter()
        .map(|s| s.loss)
        .sum::<f64>();
    assert!(last < first, "the probe's loss went from {first} to {last}");
    let none = vec![false; init.len()];
    assert!(finetune_some(&arch, &init, &none, &train, &config(1, 0.05), &mut |_| {}).is_err());
    // Everything trainable is `finetune`, bit for bit.
    let all = vec![true; init.len()];
    let (a, _) = finetune_some(&arch, &init, &all, &train, &config(2, 0.01), &mut |_| {}).unwrap();
    let (b, _) = finetune(&arch, &init, &train, &config(2, 0.01), &mut |_| {}).unwrap();
    assert_eq!(bits(&a), bits(&b));
}

#[test]
fn finetuning_learns_and_is_reproducible() {
    let arch = ClipClassifier::new(tiny_clip_config(1, 4)).unwrap();
    let init = arch.init(1, &Device::Cpu).unwrap();
    let train = quadrants(64, 1);
    let mut steps = 0;
    let cfg = FinetuneConfig {
        epochs: 8,
        ..config(5, 1e-2)
    };
    let (trained, history) = finetune(&arch, &init, &train, &cfg, &mut |_| steps += 1).unwrap();
    assert_eq!(steps, 32);
    assert_eq!(history.len(), 32);
    let mut obj = objective(&arch, quadrants(64, 2));
    let before = obj.evaluate(&init).unwrap();
    let after = obj.evaluate(&trained).unwrap();
    assert!(
        after.loss < before.loss,
        "held-out loss {} → {}",
        before.loss,
        after.loss
    );
    assert!(
        after.accuracy.unwrap() > 0.5,
        "held-out accuracy {:?}",
        after.accuracy
    );
    eprintln!(
        "held-out loss {} → {}, accuracy {:?} → {:?}",
        before.loss, after.loss, before.accuracy, after.accuracy
    );

    let (again, _) = finetune(&arch, &init, &train, &cfg, &mut |_| {}).unwrap();
    let (other, _) = finetune(
        &arch,
        &init,
        &train,
        &FinetuneConfig {
            seed: 6,
            ..cfg.clone()
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(bits(&trained), bits(&again));
    assert_ne!(bits(&trained), bits(&other));
}

#[test]
fn bad_finetuning_settings_are_named() {
    let arch = ClipClassifier::new(tiny_clip_config(1, 4)).unwrap();
    let init = arch.init(1, &Device::Cpu).unwrap();
    let data = quadrants(8, 1);
    for (cfg, what) in [
        (
            FinetuneConfig {
                lr: -1.0,
                ..config(1, 1e-3)
            },
            "lr",
        ),
        (
            FinetuneConfig {
                epochs: 0,
                ..config(1, 1e-3)
            },
            "epochs",
        ),
        (
            FinetuneConfig {
                warmup_fraction: 1.5,
                ..config(1, 1e-3)
            },
            "warmup_fraction",
        ),
        (
            FinetuneConfig {
                label_smoothing: 1.0,
                ..config(1, 1e-3)
            },
            "label_smoothing",
        ),
    ] {
        let msg = finetune(&arch, &init, &data, &cfg, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(msg.contains(what), "{msg}");
    }
    // A learning rate that diverges is reported, not written.
    let msg = finetune(
        &arch,
        &init,
        &data,
        &FinetuneConfig {
            lr: 1e30,
            clip_grad_norm: None,
            ..config(1, 1e-3)
        },
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("non-finite loss"), "{msg}");
}

#[test]
fn augmentations_do_what_they_say() {
    let mut rng = SplitMix64::new(3);
    let x = Tensor::from_vec(
        rng.normals(4 * 2 * 5 * 5)
            .into_iter()
            .map(|v| v as f32)
            .collect::<Vec<_>>(),
        (4, 2, 5, 5),
        &Device::Cpu,
    )
    .unwrap();
    let same = augment(&x, &Augment::default(), &mut rng).unwrap();
    assert_eq!(flat(&same), flat(&x));

    // Flips: every image is itself or its mirror, and both happen.
    let flipped = augment(
        &x,
        &Augment {
            horizontal_flip: true,
            ..Augment::default()
        },
        &mut rng,
    )
    .unwrap();
    for i in 0..4 {
        let out = flat(&flipped.narrow(0, i, 1).unwrap());
        let img = x.narrow(0, i, 1).unwrap();
        if out != flat(&img.flip(&[3]).unwrap()) {
            assert_eq!(out, flat(&img));
        }
    }

    // Crops of an all-ones image: zeros only within `p` pixels of the border.
    let ones = Tensor::ones((8, 1, 6, 6), DType::F32, &Device::Cpu).unwrap();
    let cropped = augment(
        &ones,
        &Augment {
            crop_padding: 2,
            ..Augment::default()
        },
        &mut rng,
    )
    .unwrap();
    let v = cropped
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (k, value) in v.iter().enumerate() {
        let (y, x) = ((k / 6) % 6, k % 6);
        if (2..4).contains(&y) && (2..4).contains(&x) {
            assert_eq!(*value, 1.0, "the centre survives any crop of padding 2");
        }
    }
    assert!(v.contains(&0.0), "some crop moved the image");

    // Crop and flip together: every output pixel of a constant image is 1 or 0.
    let both = Augment {
        crop_padding: 1,
        horizontal_flip: true,
        noise_std: 0.0,
    };
    let out = augment(&ones, &both, &mut rng).unwrap();
    assert_eq!(out.dims(), ones.dims());
    assert!(flat(&out)
        .iter()
        .all(|&b| f32::from_bits(b) == 1.0 || f32::from_bits(b) == 0.0));

    // Noise: zero mean, the configured standard deviation.
    let zeros = Tensor::zeros((16, 1, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let noisy = flat(
        &augment(
            &zeros,
            &Augment {
                noise_std: 0.5,
                ..Augment::default()
            },
            &mut rng,
        )
        .unwrap(),
    );
    let n = noisy.len() as f64;
    let mean = noisy.iter().map(|&v| f32::from_bits(v) as f64).sum::<f64>() / n;
    let std = (noisy
        .iter()
        .map(|&v| (f32::from_bits(v) as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!(
        mean.abs() < 0.03 && (std - 0.5).abs() < 0.03,
        "mean {mean}, std {std}"
    );
}

#[test]
fn mehl_soup_of_finetuned_checkpoints_on_disk() {
    let dir = ScratchDir::new("e2e");
    let arch = ClipClassifier::new(tiny_clip_config(1, 4)).unwrap();
    let init = arch.init(2, &Device::Cpu).unwrap();
    let train = quadrants(48, 3);
    let mut paths = Vec::new();
    for (i, lr) in [1e-3, 2e-3, 3e-3, 5e-3].into_iter().enumerate() {
        let cfg = FinetuneConfig {
            epochs: 2,
            ..config(i as u64, lr)
        };
        let (params, _) = finetune(&arch, &init, &train, &cfg, &mut |_| {}).unwrap();
        let path = dir.path().join(format!("model-{i}"));
        write_model_dir(&path, &arch, &params, &cfg.metadata(), "").unwrap();
        paths.push(path);
    }
    let recorded: FinetuneConfig = serde_json::from_str(
        &Checkpoint::open(&paths[3]).unwrap().metadata().unwrap()["soup.finetune"],
    )
    .unwrap();
    assert_eq!(recorded.lr, 5e-3);

    let store = FileStore::open(paths, Device::Cpu).unwrap();
    let mut obj = objective(&arch, quadrants(32, 4));
    let cfg = MehlConfig {
        model_batch: 2,
        inner_epochs: 2,
        block_cut: BlockCut::PER_TENSOR,
        frozen_tensors: Vec::new(),
        ..MehlConfig::mehl_plus()
    };
    let result = run_mehl(&store, &mut obj, &cfg, RunOptions::default()).unwrap();
    assert_eq!(result.alpha.len(), arch.layout().len());
    for row in &result.alpha {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-5);
    }
    let out = dir.path().join("soup");
    write_model_dir(
        &out,
        &arch,
        &result.soup,
        &BTreeMap::from([("soup.method".into(), result.method.clone())]),
        "",
    )
    .unwrap();
    let back = Checkpoint::open(&out).unwrap();
    let loaded = back
        .load_params(back.architecture().unwrap().as_ref(), &Device::Cpu)
        .unwrap();
    let bits = |p: &[Tensor]| -> Vec<u32> { p.iter().flat_map(flat).collect() };
    assert_eq!(
        bits(&loaded),
        bits(&result.soup),
        "the written soup loads back bit-identically"
    );
}

/// A CLIP key bias has zero gradient (softmax cancels it): measured, then frozen by MEHL+ and
/// Learned+ (α = the center's, 1/N with one model batch), with the soup's outputs unchanged.
#[test]
fn zero_gradient_blocks_are_frozen_and_the_soups_outputs_do_not_change() {
    let dir = ScratchDir::new("frozen");
    let arch = ClipClassifier::new(tiny_clip_config(1, 4)).unwrap();
    let init = arch.init(2, &Device::Cpu).unwrap();
    let train = quadrants(48, 3);
    let mut paths = Vec::new();
    for (i, lr) in [1e-3, 3e-3, 5e-3].into_iter().enumerate() {
        let (params, _) =
            finetune(&arch, &init, &train, &config(i as u64, lr), &mut |_| {}).unwrap();
        let path = dir.path().join(format!("model-{i}"));
        write_model_dir(&path, &arch, &params, &BTreeMap::new(), "").unwrap();
        paths.push(path);
    }
    let frozen = arch.zero_gradient_tensors();
    assert_eq!(frozen.len(), arch.config.num_hidden_layers);
    let layout = arch.layout();
    let index = |name: &str| layout.tensors.iter().position(|t| t.name == name).unwrap();

    // The gradient of a key bias is rounding noise next to the query bias beside it.
    let store = FileStore::open(paths, Device::Cpu).unwrap();
    let mut obj = objective(&arch, quadrants(32, 4));
    let params = soup_core::ModelStore::load(&store, 0).unwrap();
    let (_, grad) = obj
        .loss_and_grad(
            &params,
            soup_core::Batch {
                epoch_seed: 0,
                index: 0,
            },
        )
        .unwrap();
    let norm = |t: &Tensor| -> f64 {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt() as f64
    };
    for name in &frozen {
        let q = name.replace("k_proj", "q_proj");
        let (k, q) = (norm(&grad[index(name)]), norm(&grad[index(&q)]));
        assert!(k < 1e-5 * q, "{name}: |∇| {k} against the query bias's {q}");
    }

    let data = quadrants(32, 5);
    let run = |frozen_tensors: Vec<String>| {
        let cfg = MehlConfig {
            model_batch: 3,
            inner_epochs: 2,
            frozen_tensors,
            ..MehlConfig::mehl_plus()
        };
        let mut obj = objective(&arch, quadrants(32, 4));
        run_mehl(&store, &mut obj, &cfg, RunOptions::default()).unwrap()
    };
    let (with, without) = (run(frozen.clone()), run(Vec::new()));
    for name in &frozen {
        // Per-tensor blocks: block l is tensor l.
        let alpha = &with.alpha[index(name)];
        assert!(
            alpha.iter().all(|a| (a - 1.0 / 3.0).abs() < 1e-12),
            "{name}: α {alpha:?}"
        );
    }
    let logits = |soup: &[Tensor]| -> Vec<f32> {
        let rows: Vec<u32> = (0..data.len() as u32).collect();
        arch.forward(soup, &data.select(&rows).unwrap().0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (logits(&with.soup), logits(&without.soup));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff < 1e-3,
        "frozen and free soups' logits differ by {diff}"
    );

    // Learned+ the same: frozen logits a stay 0, α uniform.
    let learned = soup_core::learned_soup(
        &store,
        &mut objective(&arch, quadrants(32, 4)),
        &soup_core::LearnedConfig {
            epochs: 2,
            frozen_tensors: frozen.clone(),
            ..soup_core::LearnedConfig::learned_plus()
        },
        RunOptions::default(),
    )
    .unwrap();
    for name in &frozen {
        let alpha = &learned.alpha[index(name)];
        assert!(
            alpha.iter().all(|a| (a - 1.0 / 3.0).abs() < 1e-12),
            "{name}: α {alpha:?}"
        );
    }
}
