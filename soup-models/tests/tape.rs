//! The hand-written whole-model backward passes (`arch/tape.rs`) against candle's autograd through
//! the same architecture's `forward`: logits and the gradient of every tensor, in f64, to 1e-10
//! relative; against PyTorch's autograd (golden gradients of a tiny CLIP and of transformers'
//! DINOv2, `tests/golden/make_backward.py`); and the `Classification` objective's loss and
//! gradients through them against `soup_core::autograd_loss_and_grad` (label smoothing, shards),
//! and fine-tuning through them against fine-tuning by autograd.

use candle_core::{DType, Device, Tensor, Var};
use soup_core::rng::SplitMix64;
use soup_core::{Batch, Objective};
use soup_models::arch::clip::{ClipClassifier, ClipVitConfig};
use soup_models::arch::dinov2::{Dinov2Classifier, Dinov2Config};
use soup_models::data::text::{TokenFile, Windows};
use soup_models::testkit::fixtures::tiny_clip_config;
use soup_models::{Architecture, Classification, Dataset, Images};

/// Parameters from `init`, perturbed so that no tensor is constant (LayerNorm weights of 1,
/// zero biases), in `dtype`.
fn params(arch: &dyn Architecture, seed: u64, dtype: DType) -> Vec<Tensor> {
    let mut rng = SplitMix64::new(seed ^ 77);
    arch.init(seed, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|t| {
            let noise = rng.normals(t.elem_count());
            let noise = Tensor::from_vec(noise, t.shape(), &Device::Cpu).unwrap();
            (t.to_dtype(DType::F64).unwrap() + (noise * 0.1).unwrap())
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        })
        .collect()
}

fn normals(n: usize, shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let v = SplitMix64::new(seed).normals(n);
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn images(arch: &dyn Architecture, n: usize, seed: u64, dtype: DType) -> Tensor {
    let i = arch.image_input().unwrap();
    let shape = [n, i.channels, i.height, i.width];
    normals(shape.iter().product(), &shape, seed, dtype)
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (values(a), values(b));
    a.iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
}

/// max |a − b| / max |b| (at least 1e-6).
fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let scale = values(b)
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-6);
    max_abs_diff(a, b) / scale
}

/// The error of each gradient in `got` against `want`, in layout order: relative to the tensor's
/// largest magnitude, except for the tensors whose exact gradient is zero (the key biases), whose
/// values are rounding noise: those relative to the largest gradient of the whole model.
fn gradient_errors<G: std::borrow::Borrow<Tensor>, W: std::borrow::Borrow<Tensor>>(
    arch: &dyn Architecture,
    got: &[G],
    want: &[W],
) -> Vec<(String, f64)> {
    let zero = arch.zero_gradient_tensors();
    let largest = want.iter().fold(0.0f64, |m, w| {
        values(w.borrow()).iter().fold(m, |m, v| m.max(v.abs()))
    });
    let tensors = &arch.layout().tensors;
    assert_eq!((got.len(), want.len()), (tensors.len(), tensors.len()));
    tensors
        .iter()
        .zip(got)
        .zip(want)
        .map(|((spec, g), w)| {
            let (g, w) = (g.borrow(), w.borrow());
            let err = match zero.contains(&spec.name) {
                true => max_abs_diff(g, w) / largest,
                false => relative_error(g, w),
            };
            (spec.name.clone(), err)
        })
        .collect()
}

/// The tape's logits and gradients of ⟨R, logits⟩ (R random) against autograd's through
/// `forward`, tensor by tensor; returns the worst relative error of the gradients.
fn tape_against_autograd(arch: &dyn Architecture, n: usize, seed: u64, dtype: DType) -> f64 {
    let p = params(arch, seed, dtype);
    let x = images(arch, n, seed + 1, DType::F32);
    let vars: Vec<Var> = p.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let logits = arch.forward(&inputs, &x).unwrap();
    let r = normals(logits.elem_count(), logits.dims(), seed + 2, dtype);
    let grads = (&logits * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    let tape = arch.tape(&p, &x).unwrap().expect("a tape for CPU tensors");
    let logit_error = relative_error(tape.logits(), &logits);
    assert!(logit_error <= 1e-12, "logits differ by {logit_error:e}");
    let got = tape.backward(&r).unwrap();
    assert_eq!(got.len(), p.len());
    let want: Vec<&Tensor> = inputs
        .iter()
        .map(|t| grads.get(t).expect("autograd reaches every tensor"))
        .collect();
    // Gradients that are zero up to rounding (the key biases) are compared to the largest.
    for (spec, g) in arch.layout().tensors.iter().zip(&got) {
        assert_eq!(g.dims(), spec.shape.as_slice(), "{}", spec.name);
        assert_eq!(g.dtype(), dtype, "{}", spec.name);
    }
    let mut worst = 0.0f64;
    for (name, err) in gradient_errors(arch, &got, &want) {
        assert!(err <= 1e-10, "{name}: {err:e}");
        worst = worst.max(err);
    }
    worst
}

fn clip(config: ClipVitConfig) -> ClipClassifier {
    ClipClassifier::new(config).unwrap()
}

#[test]
fn clip_tape_gradients_equal_autograd_in_f64() {
    let configs = [
        (tiny_clip_config(3, 5), 3),
        (tiny_clip_config(1, 2), 1),
        (
            ClipVitConfig {
                num_attention_heads: 1,
                num_hidden_layers: 3,
                image_size: 8,
                ..tiny_clip_config(3, 4)
            },
            2,
        ),
    ];
    for (seed, (config, n)) in configs.into_iter().enumerate() {
        let worst = tape_against_autograd(&clip(config), n, seed as u64, DType::F64);
        eprintln!("clip, config {seed}: worst relative error {worst:e}");
    }
}

#[test]
fn dinov2_tape_gradients_equal_autograd_in_f64() {
    let configs = [
        (
            Dinov2Config {
                hidden_size: 16,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                mlp_ratio: 2,
                image_size: 12,
                patch_size: 4,
                num_classes: 4,
                ..Dinov2Config::small(14, 3)
            },
            3,
        ),
        (
            Dinov2Config {
                hidden_size: 8,
                num_hidden_layers: 1,
                num_attention_heads: 1,
                mlp_ratio: 4,
                image_size: 8,
                patch_size: 4,
                num_classes: 2,
                num_channels: 1,
                ..Dinov2Config::small(14, 3)
            },
            1,
        ),
    ];
    for (seed, (config, n)) in configs.into_iter().enumerate() {
        let arch = Dinov2Classifier::new(config).unwrap();
        let worst = tape_against_autograd(&arch, n, 10 + seed as u64, DType::F64);
        eprintln!("dinov2, config {seed}: worst relative error {worst:e}");
    }
}

#[test]
fn clip_tape_in_f32_agrees_with_autograd_to_rounding() {
    let arch = clip(tiny_clip_config(3, 5));
    let p = params(&arch, 4, DType::F32);
    let x = images(&arch, 2, 5, DType::F32);
    let tape = arch.tape(&p, &x).unwrap().unwrap();
    let logits = arch.forward(&p, &x).unwrap();
    assert!(relative_error(tape.logits(), &logits) <= 1e-5);
    let vars: Vec<Var> = p.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let logits = arch.forward(&inputs, &x).unwrap();
    let r = normals(logits.elem_count(), logits.dims(), 6, DType::F32);
    let grads = (&logits * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for ((spec, g), t) in arch
        .layout()
        .tensors
        .iter()
        .zip(tape.backward(&r).unwrap())
        .zip(&inputs)
    {
        let want = grads.get(t).unwrap();
        // The key biases' gradients are rounding noise in f32: compared absolutely.
        let err = if spec.name.ends_with("k_proj.bias") {
            max_abs_diff(&g, want)
        } else {
            relative_error(&g, want)
        };
        assert!(err <= 1e-4, "{}: {err:e}", spec.name);
    }
}

#[test]
fn tensors_the_tape_does_not_take_fall_back_to_autograd() {
    let arch = clip(tiny_clip_config(3, 5));
    let x = images(&arch, 1, 1, DType::F32);
    // Mixed dtypes, and a non-contiguous tensor.
    let mut mixed = params(&arch, 1, DType::F32);
    mixed[0] = mixed[0].to_dtype(DType::F64).unwrap();
    assert!(arch.tape(&mixed, &x).unwrap().is_none());
    let mut strided = params(&arch, 1, DType::F32);
    let head = arch
        .layout()
        .tensors
        .iter()
        .position(|t| t.name == "classification_head.weight")
        .unwrap();
    strided[head] = strided[head]
        .t()
        .unwrap()
        .contiguous()
        .unwrap()
        .t()
        .unwrap();
    assert!(!strided[head].is_contiguous());
    assert!(arch.tape(&strided, &x).unwrap().is_none());
    // Families without a hand-written backward.
    let mlp = soup_models::build(
        "mlp",
        &serde_json::json!({"input": [1, 3, 4], "hidden": [4], "num_classes": 3}),
    )
    .unwrap();
    let p = params(mlp.as_ref(), 1, DType::F32);
    let x = images(mlp.as_ref(), 1, 1, DType::F32);
    assert!(mlp.tape(&p, &x).unwrap().is_none());
}

/// A Classification objective over `n` random labelled images for `arch`.
fn objective(arch: ClipClassifier, n: usize, smoothing: f64) -> Classification {
    let x = images(&arch, n, 9, DType::F32);
    let k = arch.config.num_classes as u32;
    let labels = (0..n as u32).map(|i| (i * 7 + 3) % k).collect();
    let data = Dataset {
        images: Images::Memory(x),
        labels,
        classes: None,
    };
    let mut obj = Classification::new(std::sync::Arc::new(arch), data, 4);
    obj.label_smoothing = smoothing;
    obj
}

#[test]
fn classification_loss_and_grad_through_the_tape_equals_autograd() {
    for (smoothing, shard) in [
        (0.0, None),
        (0.1, None),
        (0.1, Some((1, 3))),
        (0.0, Some((0, 2))),
    ] {
        let arch = clip(tiny_clip_config(3, 5));
        let p = params(&arch, 3, DType::F64);
        let mut obj = objective(arch, 10, smoothing);
        if let Some((rank, world)) = shard {
            obj.set_shard(rank, world).unwrap();
        }
        for index in [0, 2] {
            let batch = Batch {
                epoch_seed: 5,
                index,
            };
            let (loss, grads) = obj.loss_and_grad(&p, batch).unwrap();
            let (want_loss, want) = soup_core::autograd_loss_and_grad(&mut obj, &p, batch).unwrap();
            let case = format!("smoothing {smoothing}, shard {shard:?}, batch {index}");
            assert!(
                (loss - want_loss).abs() <= 1e-12 * want_loss.abs().max(1.0),
                "{case}: loss {loss} against {want_loss}"
            );
            for (name, err) in gradient_errors(obj.arch.as_ref(), &grads, &want) {
                assert!(err <= 1e-10, "{case}, {name}: {err:e}");
            }
        }
    }
}

/// An architecture as it was before the hand-written backward: every method delegated, no tape.
#[derive(Debug)]
struct NoTape(std::sync::Arc<dyn Architecture>);

impl Architecture for NoTape {
    fn family(&self) -> &'static str {
        self.0.family()
    }
    fn config(&self) -> serde_json::Value {
        self.0.config()
    }
    fn layout(&self) -> &soup_core::ParamLayout {
        self.0.layout()
    }
    fn input(&self) -> soup_models::InputSpec {
        self.0.input()
    }
    fn num_classes(&self) -> usize {
        self.0.num_classes()
    }
    fn forward(&self, params: &[Tensor], images: &Tensor) -> soup_models::Result<Tensor> {
        self.0.forward(params, images)
    }
    fn init(&self, seed: u64, device: &Device) -> soup_models::Result<Vec<Tensor>> {
        self.0.init(seed, device)
    }
}

#[test]
fn fine_tuning_through_the_tape_follows_the_autograd_trajectory() {
    use soup_models::train::finetune::{finetune, Augment, FinetuneConfig};
    let arch: std::sync::Arc<dyn Architecture> = std::sync::Arc::new(clip(tiny_clip_config(3, 5)));
    let p = params(arch.as_ref(), 8, DType::F64);
    let data = objective(clip(tiny_clip_config(3, 5)), 12, 0.0).data;
    let config = FinetuneConfig {
        epochs: 2,
        batch_size: 5,
        lr: 1e-2,
        weight_decay: 0.1,
        warmup_fraction: 0.0,
        label_smoothing: 0.1,
        augment: Augment {
            crop_padding: 1,
            horizontal_flip: true,
            noise_std: 0.1,
        },
        clip_grad_norm: Some(1.0),
        seed: 3,
    };
    let (tuned, steps) = finetune(arch.as_ref(), &p, &data, &config, &mut |_| {}).unwrap();
    let reference = NoTape(arch.clone());
    let (want, want_steps) = finetune(&reference, &p, &data, &config, &mut |_| {}).unwrap();
    assert_eq!(steps.len(), 6);
    for (a, b) in steps.iter().zip(&want_steps) {
        assert!(
            (a.loss - b.loss).abs() <= 1e-10 * b.loss.abs(),
            "step {}: {} against {}",
            a.step,
            a.loss,
            b.loss
        );
    }
    for ((spec, a), b) in arch.layout().tensors.iter().zip(&tuned).zip(&want) {
        let err = relative_error(a, b);
        assert!(err <= 1e-9, "{}: {err:e}", spec.name);
        // The tensors moved: the comparison is not of two copies of the start.
    }
    let moved = relative_error(&tuned[0], &p[0]);
    assert!(
        moved > 1e-4,
        "fine-tuning moved the first tensor by {moved:e} only"
    );
}

/// The golden losses and gradients of PyTorch's autograd (`tests/golden/make_backward.py`).
fn torch_golden() -> std::collections::HashMap<String, Tensor> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/backward/expected.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// The tape's cross-entropy (label smoothing 0.1) and gradients against PyTorch's `prefix.loss`
/// and `prefix.grad.<name>`, in f64.
fn against_torch(arch: &dyn Architecture, p: &[Tensor], images: &Tensor, prefix: &str) {
    let golden = torch_golden();
    let labels: Vec<u32> = golden[&format!("{prefix}.labels")]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let tape = arch.tape(p, images).unwrap().unwrap();
    let (loss, grads) = tape
        .loss_backward(
            &soup_models::arch::tape::Target::Classes {
                labels: &labels,
                label_smoothing: 0.1,
            },
            1.0,
        )
        .unwrap();
    let want_loss = golden[&format!("{prefix}.loss")].to_vec1::<f64>().unwrap()[0];
    assert!(
        (loss - want_loss).abs() <= 1e-12 * want_loss,
        "{prefix}: loss {loss} against PyTorch's {want_loss}"
    );
    let want: Vec<&Tensor> = arch
        .layout()
        .tensors
        .iter()
        .map(|t| &golden[&format!("{prefix}.grad.{}", t.name)])
        .collect();
    for (name, err) in gradient_errors(arch, &grads, &want) {
        assert!(
            err <= 1e-10,
            "{prefix} {name}: {err:e} from PyTorch's gradient"
        );
    }
}

#[test]
fn clip_tape_gradients_equal_pytorch_autograd() {
    let golden = torch_golden();
    let arch = clip(tiny_clip_config(3, 5));
    let p: Vec<Tensor> = arch
        .layout()
        .tensors
        .iter()
        .map(|t| golden[&format!("clip.{}", t.name)].clone())
        .collect();
    against_torch(&arch, &p, &golden["clip.images"], "clip");
}

#[test]
fn dinov2_tape_gradients_equal_transformers_autograd() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/dinov2");
    let ckpt = soup_models::Checkpoint::open(dir.join("hf-dinov2")).unwrap();
    let arch = ckpt.architecture().unwrap();
    let p: Vec<Tensor> = ckpt
        .load_params(arch.as_ref(), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|t| t.to_dtype(DType::F64).unwrap())
        .collect();
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let x = expected["tiny.pixel_values"].to_dtype(DType::F64).unwrap();
    against_torch(arch.as_ref(), &p, &x, "dinov2");
}

/// Fine-tuning a language model on windows of text through its tape (the head fused with the
/// next-token loss) follows autograd's trajectory step by step, and lowers the loss.
#[test]
fn fine_tuning_a_language_model_through_the_tape_follows_the_autograd_trajectory() {
    use soup_models::train::finetune::{finetune, Augment, FinetuneConfig, TrainData};
    let config = serde_json::json!({"model_type": "llama", "vocab_size": 23, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_theta": 100000.0, "tie_word_embeddings": true,
        "attention_bias": true});
    let arch = soup_models::build("llama", &config).unwrap();
    let p = params(arch.as_ref(), 8, DType::F64);
    // Repeated short patterns, so that there is something to learn.
    let windows: Vec<Vec<u32>> = (0..10)
        .map(|i| (0..7).map(|j| ((i + 3 * j) % 23) as u32).collect())
        .collect();
    let config = FinetuneConfig {
        epochs: 3,
        batch_size: 4,
        lr: 3e-2,
        weight_decay: 0.1,
        warmup_fraction: 0.0,
        label_smoothing: 0.0,
        augment: Augment::default(),
        clip_grad_norm: Some(1.0),
        seed: 3,
    };
    let whole: [&dyn Windows; 1] = [&windows];
    let data = TrainData::Text(&whole);
    let (tuned, steps) = finetune(arch.as_ref(), &p, data, &config, &mut |_| {}).unwrap();
    // The same windows in two parts (two domains), and read back from a file of tokens, train
    // to the same bits.
    let (head, tail) = (windows[..4].to_vec(), windows[4..].to_vec());
    let dir = soup_models::testkit::fixtures::ScratchDir::new("tape-token-file");
    let file = TokenFile::create(&dir.path().join("windows.tokens"), &windows).unwrap();
    for parts in [
        vec![&head as &dyn Windows, &tail],
        vec![&file as &dyn Windows],
    ] {
        let (again, _) = finetune(
            arch.as_ref(),
            &p,
            TrainData::Text(&parts),
            &config,
            &mut |_| {},
        )
        .unwrap();
        let values = |t: &[Tensor]| -> Vec<Vec<f64>> {
            t.iter()
                .map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
                .collect()
        };
        assert_eq!(values(&again), values(&tuned));
    }
    let path = file.path().to_path_buf();
    drop(file);
    assert!(!path.exists(), "the file of tokens is removed when dropped");
    let reference = NoTape(arch.clone());
    let (want, want_steps) = finetune(&reference, &p, data, &config, &mut |_| {}).unwrap();
    assert_eq!(steps.len(), 9);
    for (a, b) in steps.iter().zip(&want_steps) {
        assert!(
            (a.loss - b.loss).abs() <= 1e-10 * b.loss.abs(),
            "step {}: {} against {}",
            a.step,
            a.loss,
            b.loss
        );
    }
    for ((spec, a), b) in arch.layout().tensors.iter().zip(&tuned).zip(&want) {
        let err = relative_error(a, b);
        assert!(err <= 1e-9, "{}: {err:e}", spec.name);
    }
    let (first, last) = (steps[0].loss, steps[8].loss);
    assert!(last < first, "the loss went from {first} to {last}");
    // Windows of different lengths are refused.
    let ragged = vec![vec![1u32, 2, 3], vec![1, 2]];
    let err = finetune(
        arch.as_ref(),
        &p,
        TrainData::Text(&[&ragged]),
        &config,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("one length"), "{err}");
}
