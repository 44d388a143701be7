//! Typed errors. Every variant names what went wrong and where, in one line.

/// Errors of soup-core. User input (an empty zoo, a bad knob, models that do not match, a diverging
/// run) is reported here, never by a panic.
#[derive(Debug, thiserror::Error)]
pub enum SoupError {
    /// The store holds no model.
    #[error("the zoo is empty: at least one model is needed")]
    EmptyZoo,
    /// The models have no tensors, or only empty ones.
    #[error("the models have no parameters")]
    EmptyLayout,
    /// A setting out of its range.
    #[error("invalid setting {name} = {value}: {reason}")]
    InvalidConfig {
        /// The setting.
        name: &'static str,
        /// Its value, as given.
        value: String,
        /// What it must be.
        reason: &'static str,
    },
    /// A model whose tensors differ from the first model's.
    #[error("model {model} does not match the first model at tensor {tensor}: {detail}")]
    LayoutMismatch {
        /// The model, by the store's name.
        model: String,
        /// The first tensor that differs.
        tensor: String,
        /// How it differs.
        detail: String,
    },
    /// A loss or gradient that became NaN or infinite: the run diverged.
    #[error("non-finite {what} at step {step} of model batch {model_batch}")]
    NonFinite {
        /// What: the loss, or the gradient's norm.
        what: &'static str,
        /// The step of the model batch.
        step: usize,
        /// The model batch.
        model_batch: usize,
    },
    /// A model holding a NaN or an infinity.
    #[error("model {model} holds a non-finite value in block {block}")]
    NonFiniteModel {
        /// The model, by the store's name.
        model: String,
        /// The block holding the value.
        block: String,
    },
    /// A data-free merge that cannot be made as asked (a parameter out of its range, too few
    /// models, no base).
    #[error("merge at tensor {tensor}: {reason}")]
    Merge {
        /// The tensor whose merge failed.
        tensor: String,
        /// Why.
        reason: String,
    },
    /// The objective has no mini-batches to learn on.
    #[error("the held-out data has no mini-batches")]
    NoData,
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error raised by code that plugs into soup-core (a model store, an objective).
    #[error("{0}")]
    External(Box<dyn std::error::Error + Send + Sync>),
}

/// The result of every fallible function of soup-core.
pub type Result<T> = std::result::Result<T, SoupError>;

impl SoupError {
    /// An [`SoupError::InvalidConfig`] for setting `name`.
    pub fn config(name: &'static str, value: impl ToString, reason: &'static str) -> Self {
        SoupError::InvalidConfig {
            name,
            value: value.to_string(),
            reason,
        }
    }
}
