//! Training: the classification objective soups and fine-tuning minimise, fine-tuning itself, and
//! the next-token metrics of language models.

pub mod finetune;
pub mod language;
pub mod multitask;
pub mod objective;

pub use language::LanguageModeling;
pub use objective::{Classification, Dataset, Images};
