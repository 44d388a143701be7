//! Model sources and fetching them: `source` parses where a model comes from (a path,
//! `hf://org/name[@revision][:file]`, a URL); `hub` (cargo feature `hub`) downloads remote ones
//! into the Hugging Face cache; [`fetch`] is the one entry point that turns any source into a
//! local path with its provenance.

#[cfg(feature = "hub")]
pub mod hub;
pub mod source;

pub use source::{ModelSource, Resolved};

use std::sync::Arc;

use crate::error::Result;

/// What a download reports as it goes, for the caller's progress display (the library itself
/// never prints).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Download<'a> {
    /// A download of `label` starts; `size` in bytes when known.
    Start { label: &'a str, size: Option<u64> },
    /// Its size became known.
    Size(u64),
    /// This many bytes are on disk (a resumed download starts above 0).
    Position(u64),
    /// This many more bytes arrived.
    Advance(u64),
    /// It ended: whole, or given up.
    End { complete: bool },
}

/// A receiver of [`Download`] reports.
#[derive(Clone)]
pub struct OnDownload(pub Arc<dyn Fn(Download) + Send + Sync>);

impl std::fmt::Debug for OnDownload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnDownload")
    }
}

/// Fetches `source`: a local path as it is, a remote source into the cache with the settings
/// of the environment ([`hub::HubConfig::from_env`]), reporting downloads to `progress`.
/// Returns the local path to open and its provenance.
pub fn fetch(source: &ModelSource, progress: Option<OnDownload>) -> Result<Resolved> {
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
pub fn fetch_str(text: &str, progress: Option<OnDownload>) -> Result<Resolved> {
    fetch(&ModelSource::parse(text)?, progress)
}
