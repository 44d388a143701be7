//! Training: the classification objective soups and fine-tuning minimise, and fine-tuning itself.

pub mod finetune;
pub mod multitask;
pub mod objective;

pub use objective::{Classification, Dataset, Images};
