//! Where a computation's tensors live: `--device cpu|cuda[:N]|auto`.
//!
//! CUDA needs a build with the cargo feature `cuda` (candle's CUDA backend); without it, asking
//! for a GPU is an error that says so, and `auto` is the CPU. Models are computed where their
//! parameters are; data sets stay in host memory and each mini-batch is copied to the device.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{ModelError, Result};

/// A device as a user names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (the default: results do not depend on a GPU being present).
    #[default]
    Cpu,
    /// CUDA GPU N; `None`: the process's local rank's GPU under MPI, else GPU 0.
    Cuda(Option<usize>),
    /// The local rank's GPU when this build and machine have one, else the CPU.
    Auto,
}

impl DeviceSpec {
    /// The names `--device` takes, for help texts.
    pub const HELP: &'static str = "cpu, cuda, cuda:N or auto";

    /// The device, with `local_rank` choosing the GPU when none is named (see [`local_rank`]).
    pub fn open(self, local_rank: usize) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => cuda(n.unwrap_or(local_rank)),
            DeviceSpec::Auto if cuda_built() => Ok(cuda(local_rank).unwrap_or(Device::Cpu)),
            DeviceSpec::Auto => Ok(Device::Cpu),
        }
    }
}

/// Whether this build has candle's CUDA backend (cargo feature `cuda`).
pub fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !cuda_built() {
        return Err(ModelError::Device(format!(
            "cuda:{ordinal}: this soup was built without CUDA (build it with `--features cuda`)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| ModelError::Device(format!("cuda:{ordinal}: {e}")))
}

/// The process's rank among those on its machine, as MPI launchers and Slurm state it
/// (`OMPI_COMM_WORLD_LOCAL_RANK`, `MPI_LOCALRANKID`, `SLURM_LOCALID`); 0 when none does.
pub fn local_rank() -> usize {
    local_rank_from(|name| std::env::var(name).ok())
}

/// [`local_rank`] reading the environment through `var`.
pub fn local_rank_from(var: impl Fn(&str) -> Option<String>) -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|name| var(name).and_then(|v| v.trim().parse().ok()))
    .unwrap_or(0)
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("unknown device {s:?}: expected {}", DeviceSpec::HELP);
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(None)),
            "auto" => Ok(DeviceSpec::Auto),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse()
                    .map(|n| DeviceSpec::Cuda(Some(n)))
                    .map_err(|_| bad())
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Cuda(Some(n)) => write!(f, "cuda:{n}"),
            DeviceSpec::Auto => f.write_str("auto"),
        }
    }
}

/// A device's name in reports: `cpu`, `cuda:N`.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_name_and_refuses_others() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(None)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(Some(3))));
        assert_eq!("auto".parse(), Ok(DeviceSpec::Auto));
        for bad in ["", "CPU", "cuda:", "cuda:-1", "cuda:x", "tpu", "cuda:1:2"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("expected cpu, cuda"), "{bad}: {e}");
        }
        for spec in ["cpu", "cuda", "cuda:3", "auto"] {
            assert_eq!(spec.parse::<DeviceSpec>().unwrap().to_string(), spec);
        }
    }

    #[test]
    fn local_rank_follows_the_launchers() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(local_rank_from(env(&[])), 0);
        assert_eq!(
            local_rank_from(env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "2")])),
            2
        );
        assert_eq!(local_rank_from(env(&[("MPI_LOCALRANKID", "1")])), 1);
        assert_eq!(local_rank_from(env(&[("SLURM_LOCALID", " 3 ")])), 3);
        assert_eq!(
            local_rank_from(env(&[
                ("OMPI_COMM_WORLD_LOCAL_RANK", "x"),
                ("SLURM_LOCALID", "1")
            ])),
            1
        );
    }

    #[test]
    fn cpu_is_the_cpu_and_auto_falls_back_to_it() {
        assert!(DeviceSpec::Cpu.open(5).unwrap().is_cpu());
        if !cuda_built() {
            assert!(DeviceSpec::Auto.open(0).unwrap().is_cpu());
            let e = DeviceSpec::Cuda(Some(1)).open(0).unwrap_err().to_string();
            assert!(e.contains("cuda:1") && e.contains("--features cuda"), "{e}");
            let e = DeviceSpec::Cuda(None).open(2).unwrap_err().to_string();
            assert!(e.contains("cuda:2"), "{e}");
        }
        assert_eq!(name(&Device::Cpu), "cpu");
    }
}
