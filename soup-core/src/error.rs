//! Typed errors. Every variant names what went wrong and where, in one line.

/// Errors of soup-core. User input (an empty zoo, a bad knob, models that do not match, a diverging
/// run) is reported here, never by a panic.
#[derive(Debug, thiserror::Error)]
pub enum SoupError {
    #[error("the zoo is empty: at least one model is needed")]
    EmptyZoo,
    #[error("the models have no parameters")]
    EmptyLayout,
    #[error("invalid setting {name} = {value}: {reason}")]
    InvalidConfig {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("model {model} does not match the first model at tensor {tensor}: {detail}")]
    LayoutMismatch {
        model: String,
        tensor: String,
        detail: String,
    },
    #[error("non-finite {what} at step {step} of model batch {model_batch}")]
    NonFinite {
        what: &'static str,
        step: usize,
        model_batch: usize,
    },
    #[error("model {model} holds a non-finite value in block {block}")]
    NonFiniteModel { model: String, block: String },
    #[error("the held-out data has no mini-batches")]
    NoData,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error raised by code that plugs into soup-core (a model store, an objective).
    #[error("{0}")]
    External(Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T> = std::result::Result<T, SoupError>;

impl SoupError {
    pub fn config(name: &'static str, value: impl ToString, reason: &'static str) -> Self {
        SoupError::InvalidConfig {
            name,
            value: value.to_string(),
            reason,
        }
    }
}
