//! Model sources and fetching them: `source` parses where a model comes from (a path,
//! `hf://org/name[@revision][:file]`, a URL); `hub` (cargo feature `hub`) downloads remote ones
//! into the Hugging Face cache; [`fetch`] is the one entry point that turns any source into a
//! local path with its provenance.

#[cfg(feature = "hub")]
pub mod hub;
pub mod source;

pub use source::{ModelSource, Resolved};

use crate::error::Result;

/// Fetches `source`: a local path as it is, a remote source into the cache with the settings
/// of the environment ([`hub::HubConfig::from_env`]), drawing download progress on stderr when
/// `progress`. Returns the local path to open and its provenance.
pub fn fetch(source: &ModelSource, progress: bool) -> Result<Resolved> {
    match source {
        ModelSource::Local(path) => Ok(Resolved {
            source: source.to_string(),
            path: path.clone(),
            commit: None,
            sha256: None,
        }),
        #[cfg(feature = "hub")]
        remote => hub::Hub::from_env()?.with_progress(progress).fetch(remote),
        #[cfg(not(feature = "hub"))]
        remote => {
            let _ = progress;
            Err(crate::error::ModelError::source(
                &remote.to_string(),
                "this soup was built without the `hub` feature, so it cannot fetch remote models",
            ))
        }
    }
}

/// Parses and fetches a source given as text.
pub fn fetch_str(text: &str, progress: bool) -> Result<Resolved> {
    fetch(&ModelSource::parse(text)?, progress)
}
