//! The one error type of the command line: a one-line message for the user. Every error the
//! binary reports is about its input (files, data, flags, a diverging run): exit code 2.

#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl CliError {
    pub fn new(message: impl Into<String>) -> Self {
        CliError(message.into())
    }
}

pub type Result<T> = std::result::Result<T, CliError>;

macro_rules! from_error {
    ($($t:ty),*) => {$(
        impl From<$t> for CliError {
            fn from(e: $t) -> Self {
                CliError(e.to_string())
            }
        }
    )*};
}

from_error!(
    soup_core::SoupError,
    soup_models::ModelError,
    candle_core::Error,
    serde_json::Error,
    toml::de::Error,
    toml::ser::Error
);

/// Attaches the path to an I/O error.
pub fn io(path: &std::path::Path, e: std::io::Error) -> CliError {
    CliError(format!("{}: {e}", path.display()))
}
