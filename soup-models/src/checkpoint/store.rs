//! A [`ModelStore`] over checkpoint files: headers are read when a layout is asked for, weights
//! only when a model is loaded.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use soup_core::{ModelStore, ParamLayout};

use crate::arch::Architecture;
use crate::checkpoint::Checkpoint;

/// N checkpoints of one architecture.
#[derive(Debug)]
pub struct FileStore {
    pub arch: Arc<dyn Architecture>,
    pub paths: Vec<PathBuf>,
    pub device: Device,
}

impl FileStore {
    /// A store over `paths` whose architecture is the first checkpoint's.
    pub fn open(paths: Vec<PathBuf>, device: Device) -> crate::Result<Self> {
        let first = paths.first().ok_or_else(|| {
            crate::ModelError::format(std::path::Path::new("<zoo>"), "the zoo is empty")
        })?;
        let arch = Checkpoint::open(first)?.architecture()?;
        Ok(Self::with_arch(paths, arch, device))
    }

    /// A store over `paths` read as `arch` (the first checkpoint's, with overrides applied).
    pub fn with_arch(paths: Vec<PathBuf>, arch: Arc<dyn Architecture>, device: Device) -> Self {
        Self {
            arch,
            paths,
            device,
        }
    }
}

impl ModelStore for FileStore {
    fn len(&self) -> usize {
        self.paths.len()
    }

    fn name(&self, i: usize) -> String {
        self.paths[i].display().to_string()
    }

    fn layout(&self, i: usize) -> soup_core::Result<ParamLayout> {
        Ok(Checkpoint::open(&self.paths[i])?.layout(self.arch.as_ref())?)
    }

    /// Model `i`'s parameters; a tensor holding NaN or an infinity is refused by name (every
    /// method would otherwise average it into a soup of NaN).
    fn load(&self, i: usize) -> soup_core::Result<Vec<Tensor>> {
        let params =
            Checkpoint::open(&self.paths[i])?.load_params(self.arch.as_ref(), &self.device)?;
        for (spec, t) in self.arch.layout().tensors.iter().zip(&params) {
            if !all_finite(t)? {
                return Err(crate::ModelError::format(
                    &self.paths[i],
                    format!("tensor {} holds NaN or infinite values", spec.name),
                )
                .into());
            }
        }
        Ok(params)
    }

    /// One tensor of model `i`, read alone from its file; checked as [`Self::load`] checks.
    fn load_tensor(&self, i: usize, tensor: usize) -> soup_core::Result<Tensor> {
        let layout = self.arch.layout();
        let spec = layout.tensors.get(tensor).ok_or_else(|| {
            soup_core::SoupError::config("tensor", tensor, "is not the index of a tensor")
        })?;
        let checkpoint = Checkpoint::open(&self.paths[i])?;
        let found = checkpoint.shape(&spec.name)?;
        if found != spec.shape {
            return Err(crate::ModelError::Shape {
                path: self.paths[i].clone(),
                tensor: spec.name.clone(),
                found,
                expected: spec.shape.clone(),
            }
            .into());
        }
        let t = checkpoint.load(&spec.name, &self.device)?;
        if !all_finite(&t)? {
            return Err(crate::ModelError::format(
                &self.paths[i],
                format!("tensor {} holds NaN or infinite values", spec.name),
            )
            .into());
        }
        Ok(t)
    }

    fn device(&self) -> Device {
        self.device.clone()
    }
}

/// Whether every value of `t` is finite (the sum of squares in f64 of finite f32 values is).
fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    if let Some(s) = soup_core::kernels::sum_squares(t) {
        return Ok(s.is_finite());
    }
    let s = t
        .to_dtype(candle_core::DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(s.is_finite())
}
