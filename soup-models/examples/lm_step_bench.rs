//! Forward + backward step time of a language model on this machine (used by `cargo xtask bench
//! --only lm`): SmolLM2-135M's shape (`llama`, 30 layers, width 576, 9 heads over 3 key/value
//! heads, vocabulary 49,152, tied embeddings), randomly initialised.
//!
//! `lm_step_bench [--batch 4] [--seq 256] [--rounds 3] [--autograd]` prints one JSON line per
//! phase with every round's seconds and the median, then the process's peak RSS, in `step_bench`'s
//! format. "step" = forward + backward + an in-place SGD update of every parameter. By default the
//! hand-written pass (`arch/llama/tape.rs`): "forward" is the decoder layers, "backward" the head
//! fused with the mean next-token cross-entropy and every gradient. With `--autograd`, candle's
//! autograd through `Architecture::forward`: "forward" is the logits and the loss.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use soup_core::rng::SplitMix64;
use soup_models::arch::tape::Target;
use soup_models::ops::log_softmax;

#[path = "common/bench_alloc.rs"]
mod bench_alloc;
#[path = "common/bench_report.rs"]
mod bench_report;
use bench_report::{peak_rss, print_phases};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench_alloc::init();
    let (mut batch, mut seq, mut rounds) = (4usize, 256usize, 3usize);
    let mut autograd = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--batch" => batch = value()?.parse()?,
            "--seq" => seq = value()?.parse()?,
            "--rounds" => rounds = value()?.parse()?,
            "--autograd" => autograd = true,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let config = serde_json::json!({"model_type": "llama", "vocab_size": 49152,
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": true});
    let arch = soup_models::build("llama", &config)?;
    let params = arch.init(1, &Device::Cpu)?;
    let vars: Vec<Var> = params
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<_, _>>()?;
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let mut rng = SplitMix64::new(2);
    let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(49152) as u32).collect();
    let tokens = Tensor::from_vec(ids, (batch, seq), &Device::Cpu)?;
    let targets = tokens.narrow(1, 1, seq - 1)?.contiguous()?;
    let numel = arch.layout().numel();
    let (mut fwd, mut bwd, mut step) = (Vec::new(), Vec::new(), Vec::new());
    let ids: Vec<u32> = tokens.flatten_all()?.to_vec1()?;
    let target = Target::NextTokens {
        tokens: &ids,
        mask: None,
    };
    for round in 0..=rounds {
        let t0 = Instant::now();
        let (t1, grads) = if autograd {
            let logits = arch.forward(&inputs, &tokens)?.narrow(1, 0, seq - 1)?;
            let nll = log_softmax(&logits)?
                .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
                .mean_all()?
                .neg()?;
            nll.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            let t1 = Instant::now();
            let grads = nll.backward()?;
            let grads: Vec<Option<Tensor>> = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).cloned())
                .collect();
            (t1, grads)
        } else {
            let tape = arch.tape(&inputs, &tokens)?.ok_or("llama has a tape")?;
            let t1 = Instant::now();
            let (_, grads) = tape.loss_backward(&target, 1.0)?;
            (t1, grads.into_iter().map(Some).collect())
        };
        let t2 = Instant::now();
        for (v, g) in vars.iter().zip(&grads) {
            if let Some(g) = g {
                soup_models::ops::cpu::axpy_inplace(v.as_tensor(), -1e-6, g)?;
            }
        }
        let t3 = Instant::now();
        if round > 0 {
            // Round 0 warms caches and allocators.
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            step.push((t3 - t0).as_secs_f64());
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let fields = format!(
        "\"bench\":\"lm-step\",\"params\":{numel},\"batch\":{batch},\"seq\":{seq},\"threads\":{threads},\"backward\":\"{}\"",
        if autograd { "autograd" } else { "tape" }
    );
    print_phases(
        &fields,
        [
            ("forward", &mut fwd),
            ("backward", &mut bwd),
            ("step", &mut step),
        ],
    );
    println!(
        "{{\"bench\":\"lm-step\",\"peak_rss_bytes\":{}}}",
        peak_rss().unwrap_or(0)
    );
    Ok(())
}
