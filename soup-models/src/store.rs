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
        Ok(Self {
            arch,
            paths,
            device,
        })
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

    fn load(&self, i: usize) -> soup_core::Result<Vec<Tensor>> {
        Ok(Checkpoint::open(&self.paths[i])?.load_params(self.arch.as_ref(), &self.device)?)
    }
}
