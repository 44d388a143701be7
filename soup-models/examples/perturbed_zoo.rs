//! A zoo of perturbed copies of one random start point, for memory and time measurements where
//! accuracy does not matter (`cargo xtask reproduce --preset scale`).
//!
//! `perturbed_zoo --arch clip-vit-b32 --classes 10 --count 24 --sigma 0.01 --seed 1 --out DIR
//! [--config JSON]` (`--config`: the architecture's configuration, e.g. a whole `clip-vit` one)
//! writes `DIR/model-00/` … (model.safetensors + config.json): model i is the seeded
//! initialisation plus Gaussian noise of standard deviation `sigma` drawn from seed (seed, i).
//! Models are made and written one at a time, so memory stays at two models; directories that
//! already exist are kept.

use candle_core::{Device, Tensor};
use soup_core::rng::{derive_seed, SplitMix64};
use soup_models::checkpoint::write_model_dir;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    soup_models::alloc::keep_freed_memory();
    let mut arch_name = "clip-vit-b32".to_string();
    let (mut classes, mut count, mut seed) = (10usize, 4usize, 1u64);
    let mut sigma = 0.01f64;
    let mut out = None;
    let mut config = serde_json::json!({});
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--arch" => arch_name = value()?,
            "--classes" => classes = value()?.parse()?,
            "--count" => count = value()?.parse()?,
            "--sigma" => sigma = value()?.parse()?,
            "--seed" => seed = value()?.parse()?,
            "--out" => out = Some(std::path::PathBuf::from(value()?)),
            "--config" => config = serde_json::from_str(&value()?)?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let out = out.ok_or("--out is required")?;
    config
        .as_object_mut()
        .ok_or("--config must be a JSON object")?
        .insert("num_classes".into(), classes.into());
    let arch = soup_models::build(&arch_name, &config)?;
    let base = arch.init(seed, &Device::Cpu)?;
    for i in 0..count {
        let dir = out.join(format!("model-{i:02}"));
        if dir.join("model.safetensors").exists() {
            continue;
        }
        let mut rng = SplitMix64::new(derive_seed(seed, &[i as u64]));
        let model: Vec<Tensor> = base
            .iter()
            .map(|t| {
                let noise: Vec<f32> = rng
                    .normals(t.elem_count())
                    .into_iter()
                    .map(|v| (sigma * v) as f32)
                    .collect();
                t + Tensor::from_vec(noise, t.shape(), &Device::Cpu)?
            })
            .collect::<Result<_, _>>()?;
        let meta = [
            ("soup.base_seed".to_string(), seed.to_string()),
            ("soup.perturbation_sigma".to_string(), sigma.to_string()),
        ]
        .into_iter()
        .collect();
        write_model_dir(&dir, arch.as_ref(), &model, &meta, "")?;
        eprintln!("perturbed_zoo: {} written", dir.display());
    }
    Ok(())
}
