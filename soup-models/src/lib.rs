//! soup-models: the model zoo side of soup. Architectures (trainable CLIP ViT classifiers, MLPs)
//! registered by name, the classification objective, and checkpoints, implementing soup-core's
//! `ModelStore` and `Objective` traits.

pub mod alloc;
pub mod arch;
pub mod error;
pub mod finetune;
pub mod fixtures;
pub mod kernels;
pub mod ops;

pub use arch::{build, Architecture, InputSpec, REGISTRY};
pub use error::{ModelError, Result};
pub mod checkpoint;
pub mod crash;
pub mod data;
#[cfg(feature = "hub")]
pub mod hub;
pub mod objective;
pub mod pt;
pub mod source;
pub mod store;
#[cfg(feature = "hub")]
pub mod test_hub;

pub use checkpoint::Checkpoint;
pub use objective::{Classification, Dataset};
pub use source::{fetch, fetch_str, ModelSource, Resolved};
pub use store::FileStore;
