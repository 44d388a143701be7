//! `llama` against what transformers computed (`tests/golden/llama/`, made once by
//! `make_llama.py` with torch 2.15 and transformers 5.24): tiny `LlamaForCausalLM` and
//! `Qwen2ForCausalLM` models saved by transformers load as they are and give its logits and
//! next-token loss; the model's gradients equal central differences for every kind of tensor.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use soup_models::arch::tape::{next_token_and_grad, Target};
use soup_models::testkit::fixtures;
use soup_models::{Architecture, Checkpoint, InputSpec};

fn golden(name: &str) -> PathBuf {
    fixtures::golden("llama", name)
}

fn expected() -> HashMap<String, Tensor> {
    fixtures::golden_tensors("llama")
}

fn load(name: &str) -> (Arc<dyn Architecture>, Vec<Tensor>) {
    let ckpt = Checkpoint::open(golden(name)).unwrap();
    let arch = ckpt.architecture().unwrap();
    let params = ckpt.load_params(arch.as_ref(), &Device::Cpu).unwrap();
    (arch, params)
}

/// The mean next-token cross-entropy of `logits` (n × t × V) on `tokens`, in f64.
fn loss_of(logits: &Tensor, tokens: &Tensor) -> f64 {
    let (_, t, v) = logits.dims3().unwrap();
    let values: Vec<f64> = logits
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let ids: Vec<u32> = tokens.flatten_all().unwrap().to_vec1().unwrap();
    next_token_and_grad(&values, (t, v), &ids, None).0
}

#[test]
fn causal_language_models_saved_by_transformers_compute_their_logits_and_loss() {
    let e = expected();
    for (name, vocab, tensors) in [("gqa", 61, 20), ("biases", 47, 35), ("qwen2", 53, 26)] {
        let (arch, params) = load(name);
        assert_eq!(arch.family(), "llama", "{name}");
        assert_eq!(arch.layout().len(), tensors, "{name}");
        assert!(
            matches!(arch.input(), InputSpec::Tokens(ref t) if t.vocab_size == vocab),
            "{name}"
        );
        let tokens = e[&format!("{name}.tokens")].to_dtype(DType::U32).unwrap();
        let logits = arch.forward(&params, &tokens).unwrap();
        let d = fixtures::rel_diff(&logits, &e[&format!("{name}.logits")]);
        assert!(
            d < 1e-5,
            "{name}: logits differ from transformers' by {d:e}"
        );
        let theirs = e[&format!("{name}.loss")].to_vec1::<f32>().unwrap()[0] as f64;
        let ours = loss_of(&logits, &tokens);
        assert!(
            (ours - theirs).abs() < 1e-5 * theirs,
            "{name}: loss {ours} against transformers' {theirs}"
        );
    }
}

#[test]
fn a_token_beyond_the_vocabulary_or_the_positions_is_an_error() {
    let (arch, params) = load("gqa");
    let bad = Tensor::new(&[[1u32, 61]], &Device::Cpu).unwrap();
    let err = arch.forward(&params, &bad).unwrap_err().to_string();
    assert!(err.contains("token id 61"), "{err}");
    let long = Tensor::zeros((1, 65), DType::U32, &Device::Cpu).unwrap();
    let err = arch.forward(&params, &long).unwrap_err().to_string();
    assert!(err.contains("65 tokens"), "{err}");
}

/// ∂loss/∂θ by autograd through the forward pass equals central differences, in f64, at a few
/// coordinates of every tensor of one layer and of the embeddings, norms and head: embeddings,
/// q/k/v/o projections and their biases, the SwiGLU's three projections and biases, both
/// RMSNorms, the final norm and a separate head.
#[test]
fn gradients_equal_central_differences_for_every_kind_of_tensor() {
    let (arch, params) = load("biases");
    let params: Vec<Tensor> = params
        .iter()
        .map(|p| p.to_dtype(DType::F64).unwrap())
        .collect();
    let tokens = Tensor::new(&[[3u32, 17, 5, 40, 9], [22, 1, 46, 8, 30]], &Device::Cpu).unwrap();
    let loss = |ps: &[Tensor]| -> Tensor {
        let logits = arch.forward(ps, &tokens).unwrap();
        let (n, t, v) = logits.dims3().unwrap();
        let shifted = logits
            .narrow(1, 0, t - 1)
            .unwrap()
            .reshape((n * (t - 1), v))
            .unwrap();
        let labels: Vec<u32> = tokens
            .narrow(1, 1, t - 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        soup_models::ops::cross_entropy(&shifted, &labels, 0.0).unwrap()
    };
    let vars: Vec<Var> = params
        .iter()
        .map(|p| Var::from_tensor(p).unwrap())
        .collect();
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = loss(&inputs).backward().unwrap();
    let layout = arch.layout();
    let mut checked = 0;
    for (i, spec) in layout.tensors.iter().enumerate() {
        if spec.name.contains("layers.1.") {
            continue;
        }
        let g: Vec<f64> = grads
            .get(&inputs[i])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let flat: Vec<f64> = params[i].flatten_all().unwrap().to_vec1().unwrap();
        for j in [0, flat.len() / 2, flat.len() - 1] {
            let at = |delta: f64| -> f64 {
                let mut v = flat.clone();
                v[j] += delta;
                let mut ps = params.clone();
                ps[i] = Tensor::from_vec(v, params[i].dims(), &Device::Cpu).unwrap();
                loss(&ps).to_scalar::<f64>().unwrap()
            };
            let h = 1e-5;
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (fd - g[j]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{}[{j}]: autograd {} against {fd}",
                spec.name,
                g[j]
            );
            checked += 1;
        }
    }
    // Embeddings, 7 projections with their biases, 2 norms, the final norm and the head.
    assert_eq!(checked, 3 * (1 + 7 * 2 + 2 + 1 + 1));
}

#[test]
fn a_config_that_cannot_be_built_is_an_error_naming_its_file() {
    let dir = fixtures::ScratchDir::new("llama-config");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden("gqa").join(f), dir.path().join(f)).unwrap();
    }
    let config = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["num_attention_heads"] = 3.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let err = Checkpoint::open(dir.path())
        .unwrap()
        .architecture()
        .unwrap_err()
        .to_string();
    assert!(err.starts_with(&format!("{}: ", config.display())), "{err}");
    assert!(err.contains("num_attention_heads"), "{err}");
}

/// The tape's loss and every gradient: the fused head's next-token loss with `weight`.
fn tape_loss(
    arch: &dyn Architecture,
    params: &[Tensor],
    tokens: &Tensor,
    mask: Option<&[bool]>,
    weight: f64,
) -> (f64, Vec<Tensor>) {
    let ids: Vec<u32> = tokens.flatten_all().unwrap().to_vec1().unwrap();
    let tape = arch
        .tape(params, tokens)
        .unwrap()
        .expect("llama has a tape");
    let target = Target::NextTokens { tokens: &ids, mask };
    tape.loss_backward(&target, weight).unwrap()
}

fn to_f64(params: &[Tensor]) -> Vec<Tensor> {
    params
        .iter()
        .map(|p| p.to_dtype(DType::F64).unwrap())
        .collect()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The hand-written pass (f32, as training runs it) gives transformers' logits and loss.
#[test]
fn the_hand_written_pass_gives_transformers_logits_and_loss() {
    let e = expected();
    for name in ["gqa", "biases", "qwen2"] {
        let (arch, params) = load(name);
        let tokens = e[&format!("{name}.tokens")].to_dtype(DType::U32).unwrap();
        let tape = arch
            .tape(&params, &tokens)
            .unwrap()
            .expect("llama has a tape");
        let d = fixtures::rel_diff(tape.logits(), &e[&format!("{name}.logits")]);
        assert!(
            d < 1e-5,
            "{name}: logits differ from transformers' by {d:e}"
        );
        let (ours, _) = tape_loss(arch.as_ref(), &params, &tokens, None, 1.0);
        let theirs = e[&format!("{name}.loss")].to_vec1::<f32>().unwrap()[0] as f64;
        assert!(
            (ours - theirs).abs() < 1e-5 * theirs,
            "{name}: loss {ours} against transformers' {theirs}"
        );
    }
}

/// In f64, the hand-written gradients of every tensor equal autograd's through the candle
/// forward (tied and separate heads, grouped-query attention, biases in both families).
#[test]
fn the_hand_written_gradients_equal_autograd_for_every_tensor() {
    let e = expected();
    for name in ["gqa", "biases", "qwen2"] {
        let (arch, params) = load(name);
        let params = to_f64(&params);
        let tokens = e[&format!("{name}.tokens")].to_dtype(DType::U32).unwrap();
        let vars: Vec<Var> = params
            .iter()
            .map(|p| Var::from_tensor(p).unwrap())
            .collect();
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let logits = arch.forward(&inputs, &tokens).unwrap();
        let (n, t, v) = logits.dims3().unwrap();
        let shifted = logits
            .narrow(1, 0, t - 1)
            .unwrap()
            .reshape((n * (t - 1), v))
            .unwrap();
        let labels: Vec<u32> = values(&tokens.narrow(1, 1, t - 1).unwrap())
            .iter()
            .map(|&x| x as u32)
            .collect();
        let loss = soup_models::ops::cross_entropy(&shifted, &labels, 0.0).unwrap();
        let autograd = loss.backward().unwrap();
        let (ours, grads) = tape_loss(arch.as_ref(), &params, &tokens, None, 1.0);
        let theirs = loss.to_scalar::<f64>().unwrap();
        assert!(
            (ours - theirs).abs() < 1e-12,
            "{name}: loss {ours} against {theirs}"
        );
        for (i, spec) in arch.layout().tensors.iter().enumerate() {
            let want = values(autograd.get(&inputs[i]).unwrap());
            let got = values(&grads[i]);
            assert_eq!(
                grads[i].dims(),
                spec.shape.as_slice(),
                "{name} {}",
                spec.name
            );
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 1e-10 * (1.0 + scale),
                "{name} {}: tape and autograd differ by {diff:e} (largest {scale:e})",
                spec.name
            );
        }
    }
}

/// The fused head (logits a chunk at a time, only the rows that predict a token) equals the full
/// logits' loss and backward, with padding masked and a weight.
#[test]
fn the_fused_head_equals_the_full_logits_with_a_mask_and_a_weight() {
    let (arch, params) = load("biases");
    let params = to_f64(&params);
    let tokens = expected()["biases.tokens"].to_dtype(DType::U32).unwrap();
    let ids: Vec<u32> = tokens.flatten_all().unwrap().to_vec1().unwrap();
    let (n, t) = tokens.dims2().unwrap();
    // The second sequence padded after its fifth token, the third from its second.
    let mask: Vec<bool> = (0..n * t)
        .map(|i| !(i / t == 1 && i % t >= 5 || i / t == 2 && i % t >= 2))
        .collect();
    let (fused, fused_grads) = tape_loss(arch.as_ref(), &params, &tokens, Some(&mask), 0.5);
    let tape = arch.tape(&params, &tokens).unwrap().unwrap();
    let (loss, dlogits) = next_token_and_grad(&values(tape.logits()), (t, 47), &ids, Some(&mask));
    let dlogits: Vec<f64> = dlogits.iter().map(|g| 0.5 * g).collect();
    let dlogits = Tensor::from_vec(dlogits, (n, t, 47), &Device::Cpu).unwrap();
    let grads = tape.backward(&dlogits).unwrap();
    assert!(
        (fused - 0.5 * loss).abs() < 1e-12,
        "{fused} against {}",
        0.5 * loss
    );
    for (i, (a, b)) in fused_grads.iter().zip(&grads).enumerate() {
        let (a, b) = (values(a), values(b));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff < 1e-12, "tensor {i}: {diff:e}");
    }
}

/// The hand-written gradients equal central differences of the hand-written loss, at three
/// coordinates of every tensor of the first layer and of the embeddings, norm and head.
#[test]
fn the_hand_written_gradients_equal_central_differences() {
    let (arch, params) = load("biases");
    let params = to_f64(&params);
    let tokens = Tensor::new(&[[3u32, 17, 5, 40, 9], [22, 1, 46, 8, 30]], &Device::Cpu).unwrap();
    let (_, grads) = tape_loss(arch.as_ref(), &params, &tokens, None, 1.0);
    let mut checked = 0;
    for (i, spec) in arch.layout().tensors.iter().enumerate() {
        if spec.name.contains("layers.1.") {
            continue;
        }
        let g = values(&grads[i]);
        let flat = values(&params[i]);
        for j in [0, flat.len() / 2, flat.len() - 1] {
            let at = |delta: f64| {
                let mut v = flat.clone();
                v[j] += delta;
                let mut ps = params.clone();
                ps[i] = Tensor::from_vec(v, params[i].dims(), &Device::Cpu).unwrap();
                tape_loss(arch.as_ref(), &ps, &tokens, None, 1.0).0
            };
            let h = 1e-5;
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (fd - g[j]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{}[{j}]: tape {} against {fd}",
                spec.name,
                g[j]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * (1 + 7 * 2 + 2 + 1 + 1));
}

/// Twelve windows of 6 tokens drawn from the gqa model's vocabulary.
fn windows(seed: u64) -> Vec<Vec<u32>> {
    let mut rng = soup_core::rng::SplitMix64::new(seed);
    (0..12)
        .map(|_| (0..6).map(|_| rng.below(61) as u32).collect())
        .collect()
}

/// The language-model objective's gradients (the tape's fused head) equal autograd's through
/// its loss, batch by batch; two shards' losses and gradients add up to the whole batch's; its
/// metrics rank by loss.
#[test]
fn the_language_model_objective_is_next_token_cross_entropy_of_its_batches() {
    use soup_core::{Batch, Objective};
    let (arch, params) = load("gqa");
    let params = to_f64(&params);
    let mut objective = soup_models::LanguageModeling::new(arch.clone(), windows(3), 5).unwrap();
    assert_eq!(objective.num_batches(), 3);
    for index in 0..3 {
        let batch = Batch {
            epoch_seed: 9,
            index,
        };
        let rows = objective.batch_rows(batch);
        assert_eq!(rows.len(), if index < 2 { 5 } else { 2 });
        let (loss, grads) = objective.loss_and_grad(&params, batch).unwrap();
        let (reference, reference_grads) =
            soup_core::autograd_loss_and_grad(&mut objective, &params, batch).unwrap();
        assert!((loss - reference).abs() < 1e-12, "{loss} {reference}");
        for (a, b) in grads.iter().zip(&reference_grads) {
            let diff = values(a)
                .iter()
                .zip(values(b))
                .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff < 1e-10, "batch {index}: {diff:e}");
        }
        // The mean over the batch's windows of each window's mean next-token loss.
        let mut each = 0.0;
        for &r in &rows {
            let w = Tensor::new(objective.windows[r].as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            each += loss_of(&arch.forward(&params, &w).unwrap(), &w);
        }
        assert!((loss - each / rows.len() as f64).abs() < 1e-12);
        // Two shards add up to the whole batch.
        let mut total = 0.0;
        let mut sums: Vec<Vec<f64>> = grads.iter().map(|g| vec![0.0; g.elem_count()]).collect();
        for rank in 0..2 {
            objective.set_shard(rank, 2).unwrap();
            let (l, g) = objective.loss_and_grad(&params, batch).unwrap();
            total += l;
            for (s, g) in sums.iter_mut().zip(&g) {
                for (a, b) in s.iter_mut().zip(values(g)) {
                    *a += b;
                }
            }
        }
        objective.set_shard(0, 1).unwrap();
        assert!(
            (total - loss).abs() < 1e-12,
            "shards {total} against {loss}"
        );
        for (s, g) in sums.iter().zip(&grads) {
            let diff = s
                .iter()
                .zip(values(g))
                .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff < 1e-12, "shards: {diff:e}");
        }
    }
    let m = objective.evaluate(&params).unwrap();
    assert_eq!(m.count, 12 * 5);
    assert_eq!(m.rank, soup_core::Rank::Loss);
    assert_eq!(m.score(), -m.loss);
    assert!(m.accuracy.is_some());
}

#[test]
fn the_language_model_objective_refuses_windows_it_cannot_read() {
    let (arch, _) = load("gqa");
    let new = |w: Vec<Vec<u32>>| {
        soup_models::LanguageModeling::new(arch.clone(), w, 4)
            .unwrap_err()
            .to_string()
    };
    assert!(new(vec![vec![1, 2, 3], vec![1, 2]]).contains("one length"));
    assert!(new(vec![vec![1]]).contains("at least 2"));
    assert!(new(vec![vec![1, 61]]).contains("token id 61"));
    assert!(new(vec![vec![0; 65]]).contains("65 tokens"));
}
