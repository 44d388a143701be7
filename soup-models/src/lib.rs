//! soup-models: the model zoo side of soup, implementing soup-core's `ModelStore` and
//! `Objective` traits. One folder per job:
//!
//! - `arch`: architectures registered by name (trainable CLIP and DINOv2 ViT classifiers, MLPs),
//!   and the transformer layers they share (`arch::tape`);
//! - `ops`: the operations models are built of (composed reference ops; `ops::cpu`, the fused
//!   CPU kernels with hand-written backward passes);
//! - `checkpoint`: reading and writing safetensors, sharded and Hugging Face directories,
//!   PyTorch `.pt` files (`checkpoint::torch`), and the `FileStore` over a zoo of them;
//! - `remote`: model sources (path, Hub, URL) and the one `fetch`;
//! - `train`: the classification objective and fine-tuning;
//! - `data`: labelled image data sets and their preprocessing;
//! - `device`: `--device cpu|cuda[:N]|auto` (CUDA with the cargo feature `cuda`);
//! - `alloc` (how soup's binaries set malloc to keep freed memory) and `crash` (crash points
//!   for tests);
//! - `testkit` (feature `testkit`, tests only): fixtures and the Hub stand-in.

pub mod alloc;
pub mod arch;
pub mod checkpoint;
pub mod crash;
pub mod data;
pub mod device;
pub mod error;
pub mod ops;
pub mod remote;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod train;

pub use arch::{build, Architecture, ImageSpec, InputSpec, TokenSpec, REGISTRY};
pub use checkpoint::store::FileStore;
pub use checkpoint::Checkpoint;
pub use device::DeviceSpec;
pub use error::{ModelError, Result};
pub use remote::{fetch, fetch_str, ModelSource, Resolved};
pub use train::{Classification, Dataset, Images, LanguageModeling};
