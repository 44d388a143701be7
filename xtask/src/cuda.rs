//! The CUDA toolkit CI builds soup's `cuda` feature with: nvcc and the headers candle's kernels
//! need, from PyPI's NVIDIA wheels (pinned), in `target/cuda-toolkit/`. No GPU and no driver are
//! needed to compile; linking needs the driver's `libcuda`, so CI checks and lints, it does not
//! link (README, "GPUs").

use std::path::PathBuf;
use std::process::Command;

use crate::root;

/// The wheels: nvcc 13.5 with what it runs (crt, nvvm, the runtime headers) and CCCL (the
/// `nv/target` headers candle-kernels includes).
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.5.37",
    "nvidia-cuda-crt==13.5.37",
    "nvidia-nvvm==13.5.37",
    "nvidia-cuda-runtime==13.5.37",
    "nvidia-cuda-cccl==13.3.5.0.6",
];

/// The toolkit's root (`.../nvidia/cu13`), installed with pip when missing.
pub fn ensure_toolkit() -> Result<PathBuf, String> {
    let target = root().join("target/cuda-toolkit");
    let cu13 = target.join("nvidia/cu13");
    if cu13.join("bin/nvcc").is_file() {
        return Ok(cu13);
    }
    eprintln!(
        "xtask: installing the CUDA compiler from PyPI into {}",
        target.display()
    );
    let ok = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("--target")
        .arg(&target)
        .args(WHEELS)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok || !cu13.join("bin/nvcc").is_file() {
        return Err(format!(
            "could not install nvcc with `python3 -m pip install --target {} {}`",
            target.display(),
            WHEELS.join(" ")
        ));
    }
    Ok(cu13)
}

/// The environment candle's CUDA build reads: nvcc on the PATH, the toolkit's root, the compute
/// capability to compile for (no GPU to ask: 9.0, Hopper), the CUDA version cudarc 0.19.10
/// binds (it knows versions up to 13.4 and panics on 13.5; 13.4's API is what 13.5 keeps), and
/// how many nvcc processes candle-kernels' build script runs at once: every core (cudaforge
/// takes half of them by default, which leaves one of CI's two cores idle).
pub fn env(cu13: &std::path::Path) -> Vec<(String, String)> {
    let path = std::env::var("PATH").unwrap_or_default();
    let root = cu13.display().to_string();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    vec![
        ("PATH".into(), format!("{root}/bin:{path}")),
        ("CUDA_ROOT".into(), root.clone()),
        ("CUDA_PATH".into(), root),
        ("CUDA_COMPUTE_CAP".into(), "90".into()),
        ("CUDARC_CUDA_VERSION".into(), "13040".into()),
        ("CUDAFORGE_THREADS".into(), cores.to_string()),
    ]
}
