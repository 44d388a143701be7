//! Checkpoint loading throughput against the machine's copy bandwidth (used by
//! `cargo xtask bench`).
//!
//! `load_bench [--arch clip-vit-b32] [--models 4] [--rounds 5] [--dir DIR]`
//!
//! Writes `--models` checkpoints of the architecture into DIR (kept between runs), then
//! alternates, `--rounds` times: (a) copying one model's bytes between two already-touched
//! buffers on all threads (the copy bandwidth, counting the bytes once), and (b) loading every
//! model through `FileStore::load` (`soup mix`'s path) from the page cache (the files were just
//! written or read). Prints JSON lines with every round's GB/s and the medians.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use soup_core::ModelStore;
use soup_models::checkpoint::write_model_dir;
use soup_models::FileStore;

#[path = "common/bench_alloc.rs"]
mod bench_alloc;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench_alloc::init();
    let mut arch_name = "clip-vit-b32".to_string();
    let (mut models, mut rounds) = (4usize, 5usize);
    let mut dir = std::path::PathBuf::from("target/bench/load-zoo");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--arch" => arch_name = value()?,
            "--models" => models = value()?.parse()?,
            "--rounds" => rounds = value()?.parse()?,
            "--dir" => dir = value()?.into(),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let arch = soup_models::build(&arch_name, &serde_json::json!({ "num_classes": 1000 }))?;
    let mut paths = Vec::new();
    for i in 0..models {
        let d = dir.join(format!("model-{i:02}"));
        if !d.join("model.safetensors").exists() {
            let params: Vec<Tensor> = arch
                .layout()
                .tensors
                .iter()
                .map(|t| Tensor::rand(-1f32, 1.0, t.shape.as_slice(), &Device::Cpu))
                .collect::<Result<_, _>>()?;
            write_model_dir(&d, arch.as_ref(), &params, &BTreeMap::new(), "")?;
        }
        paths.push(d.join("model.safetensors"));
    }
    let store = FileStore::open(paths, Device::Cpu)?;
    let bytes = arch.layout().numel() * 4;
    let src = vec![1.0f32; bytes / 4];
    let mut dst = vec![0.0f32; bytes / 4];
    // Read every file once so that all rounds load from the page cache.
    for i in 0..models {
        store.load(i)?;
    }
    let (mut copy, mut load) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        dst.par_chunks_mut(1 << 20)
            .zip(src.par_chunks(1 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s));
        copy.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        for i in 0..models {
            let params = store.load(i)?;
            assert_eq!(params.len(), arch.layout().len());
        }
        load.push((models * bytes) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    assert!(dst[dst.len() - 1] == 1.0);
    for (kind, v) in [("copy", &copy), ("load", &load)] {
        let s: Vec<String> = v.iter().map(|s| format!("{s:.2}")).collect();
        println!(
            "{{\"bench\":\"load\",\"arch\":\"{arch_name}\",\"bytes_per_model\":{bytes},\"models\":{models},\"kind\":\"{kind}\",\"gb_per_s\":[{}],\"median_gb_per_s\":{:.2}}}",
            s.join(","),
            median(v)
        );
    }
    Ok(())
}
