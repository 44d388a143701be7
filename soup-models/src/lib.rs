//! soup-models: the model zoo side of soup. Architectures (trainable CLIP ViT classifiers, MLPs)
//! registered by name, the classification objective, and checkpoints, implementing soup-core's
//! `ModelStore` and `Objective` traits.

pub mod arch;
pub mod error;
pub mod finetune;
pub mod fixtures;
pub mod ops;

pub use arch::{build, Architecture, InputSpec, REGISTRY};
pub use error::{ModelError, Result};
pub mod checkpoint;
pub mod data;
pub mod objective;
pub mod pt;
pub mod store;

pub use checkpoint::Checkpoint;
pub use objective::{Classification, Dataset};
pub use store::FileStore;
