//! One MEHL-Soup+ coefficient step against one plain training step of the same model, side by
//! side in one process (used by `cargo xtask bench`).
//!
//! `mehl_bench [--arch clip-vit-b32] [--b 8] [--batch 8] [--steps 4] [--rounds 3] [--classes 10]
//! [--direction-dtype f32|bf16|f16]`
//!
//! A zoo of b models (one random start plus uniform noise, made when MEHL loads a model, as a
//! file-backed zoo reads one: only the start stays in memory) and `batch × steps` random
//! held-out images. Each round runs `steps` plain steps (the loss and ∇θ as MEHL gets them from
//! the objective, then θ ← θ − η∇θ in place)
//! and then MEHL-Soup+ over the b models for `steps` coefficient steps (one model batch, one inner
//! epoch, the real `soup_core::run_mehl` loop: materialise θ, forward, backward, clip, project,
//! AdamW on X). Prints one JSON line per kind with every step's seconds and the median: the first
//! MEHL+ step of each model batch apart from the others, the memory-bound parts alone and the
//! making of the b directions from loaded models (twice; the first warms the allocator); then
//! the process's peak RSS.

use std::cell::Cell;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use soup_core::RunOptions;
use soup_core::{run_mehl, Batch, Event, MehlConfig, ModelStore, Objective, ParamLayout};
use soup_models::ops::cpu as kernels;
use soup_models::{Classification, Dataset};

#[path = "common/bench_alloc.rs"]
mod bench_alloc;

/// Model i = the start + uniform noise in [−0.01, 0.01) from seed i: the same tensors at every
/// load, made on demand.
struct Zoo {
    layout: ParamLayout,
    start: Vec<Tensor>,
    len: usize,
}

impl ModelStore for Zoo {
    fn len(&self) -> usize {
        self.len
    }
    fn name(&self, i: usize) -> String {
        format!("model {i}")
    }
    fn layout(&self, _: usize) -> soup_core::Result<ParamLayout> {
        Ok(self.layout.clone())
    }
    fn load(&self, i: usize) -> soup_core::Result<Vec<Tensor>> {
        let mut rng = soup_core::rng::SplitMix64::new(1000 + i as u64);
        let mut noisy = |t: &Tensor| -> candle_core::Result<Tensor> {
            let noise: Vec<f32> = (0..t.elem_count())
                .map(|_| (rng.next_f64() * 0.02 - 0.01) as f32)
                .collect();
            t + Tensor::from_vec(noise, t.shape(), t.device())?
        };
        Ok(self
            .start
            .iter()
            .map(&mut noisy)
            .collect::<candle_core::Result<_>>()?)
    }
}

/// Peak resident set size of this process (VmHWM), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench_alloc::init();
    let mut arch_name = "clip-vit-b32".to_string();
    let (mut b, mut batch, mut steps, mut rounds, mut classes) = (8, 8, 4, 3, 10);
    let mut direction_dtype = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--arch" => arch_name = value()?,
            "--b" => b = value()?.parse()?,
            "--batch" => batch = value()?.parse()?,
            "--steps" => steps = value()?.parse()?,
            "--rounds" => rounds = value()?.parse()?,
            "--classes" => classes = value()?.parse()?,
            "--direction-dtype" => {
                direction_dtype = match value()?.as_str() {
                    "f32" => None,
                    "bf16" => Some(candle_core::DType::BF16),
                    "f16" => Some(candle_core::DType::F16),
                    other => {
                        return Err(format!("--direction-dtype {other}: f32, bf16 or f16").into())
                    }
                }
            }
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let dev = Device::Cpu;
    let arch = soup_models::build(&arch_name, &serde_json::json!({ "num_classes": classes }))?;
    let base = arch.init(1, &dev)?;
    let zoo = Zoo {
        layout: arch.layout().clone(),
        start: base.clone(),
        len: b,
    };
    let spec = arch.image_input()?;
    let n = batch * steps;
    let images = Tensor::randn(0f32, 1.0, (n, spec.channels, spec.height, spec.width), &dev)?;
    let labels: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
    let mut objective =
        Classification::new(arch.clone(), Dataset::in_memory(images, labels), batch);
    let config = MehlConfig {
        model_batch: b,
        inner_epochs: 1,
        evaluate_each_model_batch: false,
        direction_dtype,
        ..MehlConfig::mehl_plus()
    };

    let vars: Vec<Var> = base
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<_, _>>()?;
    let theta: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (mut plain, mut mehl, mut first) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..=rounds {
        // Plain training: the same objective, batches and model size; SGD in place.
        let mut times = Vec::new();
        for index in 0..steps {
            let t0 = Instant::now();
            let batch = Batch {
                epoch_seed: 7,
                index,
            };
            // The loss and ∇θ as MEHL gets them (the hand-written backward where there is one).
            let (_, grads) = objective.loss_and_grad(&theta, batch)?;
            for (t, g) in theta.iter().zip(&grads) {
                kernels::axpy_inplace(t, -1e-6, g)?;
            }
            times.push(t0.elapsed().as_secs_f64());
        }
        // MEHL-Soup+: the step time is the time between successive Step events (the first
        // measured from BatchStart, after the hyperplane is built).
        let last = Cell::new(None::<Instant>);
        let mut step_times = Vec::new();
        run_mehl(
            &zoo,
            &mut objective,
            &config,
            RunOptions::new(&mut |e| match e {
                Event::BatchStart { .. } => last.set(Some(Instant::now())),
                Event::Step { .. } => {
                    let now = Instant::now();
                    if let Some(t) = last.get() {
                        step_times.push((now - t).as_secs_f64());
                    }
                    last.set(Some(now));
                }
                _ => {}
            }),
        )?;
        if round > 0 {
            // Round 0 warms caches and allocators. The first step of a model batch (θ starts as
            // the center and is copied into variables) is reported on its own: a real model batch
            // has hundreds of steps.
            plain.extend(times);
            first.push(step_times[0]);
            mehl.extend(&step_times[1..]);
        }
    }
    // The memory-bound parts of a MEHL step alone, on the same hyperplane (b directions):
    // ∇θ's projection on the directions with its global norm (one pass, as a step makes them), and
    // θ = c + Σ X d.
    let blocks = config.block_cut.blocks(&zoo.layout)?;
    let members: Vec<usize> = (0..b).collect();
    let mean = soup_core::zoo::Zoo::open(&zoo)?.mean(&members)?;
    // The hyperplane's directions from the b models, without the time the zoo takes to make
    // them (a file-backed zoo reads them instead: `--only load`).
    let center = soup_core::to_blocks(&mean, &blocks)?;
    let mut directions = Vec::new();
    let mut build =
        |center: Vec<Tensor>| -> Result<soup_core::Hyperplane, Box<dyn std::error::Error>> {
            let loading = Cell::new(0.0);
            let t0 = Instant::now();
            let hp = soup_core::Hyperplane::new_share(
                zoo.layout.clone(),
                blocks.clone(),
                center,
                vec![vec![1.0 / b as f64; b]; blocks.len()],
                members.clone(),
                b,
                direction_dtype,
                soup_core::Directions::Unit,
                |j| {
                    let t = Instant::now();
                    let model = zoo.load(j)?;
                    loading.set(loading.get() + t.elapsed().as_secs_f64());
                    Ok((zoo.name(j), model))
                },
            )?;
            directions.push(t0.elapsed().as_secs_f64() - loading.get());
            Ok(hp)
        };
    build(center.clone())?;
    let mut hp = build(center)?;
    directions.remove(0);
    hp.x.iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = 1e-3 * (i % 7) as f64);
    let grad = &zoo.load(0)?;
    let (mut project, mut materialise) = (Vec::new(), Vec::new());
    let mut theta = hp.theta_step(None)?;
    for round in 0..=rounds * steps {
        let t0 = Instant::now();
        let (gx, norm) = hp.project_and_norm(grad)?;
        let t1 = Instant::now();
        theta = hp.theta_step(Some(theta))?;
        let t2 = Instant::now();
        assert!(norm.is_finite() && gx.len() == hp.x.len() && theta.len() == grad.len());
        if round > 0 {
            project.push((t1 - t0).as_secs_f64());
            materialise.push((t2 - t1).as_secs_f64());
        }
    }
    let numel = arch.layout().numel();
    for (kind, v) in [
        ("plain", &plain),
        ("mehl+", &mehl),
        ("mehl+ first step", &first),
        ("mehl+ norm and projection", &project),
        ("mehl+ materialise", &materialise),
        ("mehl+ directions from b loaded models", &directions),
    ] {
        let s: Vec<String> = v.iter().map(|s| format!("{s:.4}")).collect();
        println!(
            "{{\"bench\":\"mehl-step\",\"arch\":\"{arch_name}\",\"params\":{numel},\"b\":{b},\"batch\":{batch},\"kind\":\"{kind}\",\"seconds\":[{}],\"median_s\":{:.4}}}",
            s.join(","),
            median(v)
        );
    }
    println!(
        "{{\"bench\":\"mehl-step\",\"arch\":\"{arch_name}\",\"b\":{b},\"batch\":{batch},\"peak_rss_bytes\":{}}}",
        peak_rss().unwrap_or(0)
    );
    Ok(())
}
