//! Forward + backward step time of a CLIP classifier on this machine (used by `cargo xtask bench`).
//!
//! `step_bench [--arch clip-vit-b32|dinov2-vit-s14|…] [--batch 8] [--rounds 5] [--classes 1000]
//! [--backward tape|autograd]` prints one JSON line per phase with every round's seconds and the
//! median, then the process's peak RSS. "step" = forward + backward + an in-place SGD update of
//! every parameter. The backward is the architecture's hand-written one (`tape`, what soup's
//! objectives run; autograd where the family has none) or candle's autograd (`autograd`).

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use soup_core::rng::SplitMix64;
use soup_models::arch::dinov2::{Dinov2Classifier, Dinov2Config};
use soup_models::arch::tape::Target;
use soup_models::ops::cross_entropy;

#[path = "common/bench_alloc.rs"]
mod bench_alloc;
#[path = "common/bench_report.rs"]
mod bench_report;
use bench_report::{peak_rss, print_phases};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench_alloc::init();
    soup_models::ops::cpu::GemmKernels::check_env()?;
    let mut arch_name = "clip-vit-b32".to_string();
    let (mut batch, mut rounds, mut classes) = (8usize, 5usize, 1000usize);
    let mut backward = "tape".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--arch" => arch_name = value()?,
            "--batch" => batch = value()?.parse()?,
            "--rounds" => rounds = value()?.parse()?,
            "--classes" => classes = value()?.parse()?,
            "--backward" => backward = value()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    // DINOv2-S/14 at 224 px (257 tokens), or a registry name with `num_classes` only.
    let arch: std::sync::Arc<dyn soup_models::Architecture> = match arch_name.as_str() {
        "dinov2-vit-s14" => {
            std::sync::Arc::new(Dinov2Classifier::new(Dinov2Config::small(224, classes))?)
        }
        name => soup_models::build(name, &serde_json::json!({ "num_classes": classes }))?,
    };
    let params = arch.init(1, &Device::Cpu)?;
    let vars: Vec<Var> = params
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<_, _>>()?;
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let spec = arch.image_input()?;
    let mut rng = SplitMix64::new(2);
    let n = batch * spec.channels * spec.height * spec.width;
    let pixels: Vec<f32> = rng.normals(n).into_iter().map(|v| v as f32).collect();
    let images = Tensor::from_vec(
        pixels,
        (batch, spec.channels, spec.height, spec.width),
        &Device::Cpu,
    )?;
    let labels: Vec<u32> = (0..batch).map(|i| (i % classes) as u32).collect();
    let numel: usize = arch.layout().numel();

    let (mut fwd, mut bwd, mut step) = (Vec::new(), Vec::new(), Vec::new());
    let use_tape = match backward.as_str() {
        "tape" => arch.tape(&params, &images)?.is_some(),
        "autograd" => false,
        other => return Err(format!("--backward {other}: tape or autograd").into()),
    };
    let backward = if use_tape { "tape" } else { "autograd" };
    for round in 0..=rounds {
        if use_tape {
            let t0 = Instant::now();
            let tape = arch.tape(&params, &images)?.expect("checked above");
            // The loss and its gradient with respect to the logits are part of the backward.
            let t1 = Instant::now();
            let target = Target::Classes {
                labels: &labels,
                label_smoothing: 0.0,
            };
            let (_, grads) = tape.loss_backward(&target, 1.0)?;
            let t2 = Instant::now();
            for (p, g) in params.iter().zip(&grads) {
                soup_models::ops::cpu::axpy_inplace(p, -1e-6, g)?;
            }
            let t3 = Instant::now();
            if round > 0 {
                fwd.push((t1 - t0).as_secs_f64());
                bwd.push((t2 - t1).as_secs_f64());
                step.push((t3 - t0).as_secs_f64());
            }
            continue;
        }
        let t0 = Instant::now();
        let loss = cross_entropy(&arch.forward(&inputs, &images)?, &labels, 0.0)?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        // θ ← θ − 1e-6·∇θ in place, as the PyTorch reference does (`p.sub_(g, alpha=1e-6)`).
        for v in &vars {
            if let Some(g) = grads.get(v.as_tensor()) {
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
        "\"bench\":\"clip-step\",\"arch\":\"{arch_name}\",\"params\":{numel},\"batch\":{batch},\"threads\":{threads},\"gemm_kernels\":\"{}\",\"backward\":\"{backward}\"",
        soup_models::ops::cpu::GemmKernels::current().name(),
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
        "{{\"bench\":\"clip-step\",\"arch\":\"{arch_name}\",\"batch\":{batch},\"peak_rss_bytes\":{}}}",
        peak_rss().unwrap_or(0)
    );
    Ok(())
}
