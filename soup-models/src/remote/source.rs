//! Where a model comes from: a local path, a Hugging Face Hub repository or one file of it
//! (`hf://org/name[@revision][:file]`), or an `http(s)://` URL with an optional sha256.
//! Parsing only: [`super::fetch`] turns a source into a local path plus its provenance.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::error::{ModelError, Result};

/// A model source as users write it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A checkpoint file or model directory on this machine.
    Local(PathBuf),
    /// A Hub model repository: the whole model (config.json and weights), or `file` alone.
    Hub {
        repo: String,
        revision: Option<String>,
        file: Option<String>,
    },
    /// A file at a URL; `sha256` (hex) is checked when given.
    Url { url: String, sha256: Option<String> },
}

/// A fetched source: the local path to open and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Resolved {
    /// The source as the user gave it.
    pub source: String,
    /// The local file or directory ([`crate::Checkpoint::open`] takes it).
    pub path: PathBuf,
    /// The Hub commit the files were taken from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The sha256 of a URL download.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

fn bad(source: &str, why: &str) -> ModelError {
    ModelError::source(source, why)
}

fn valid_repo_part(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl ModelSource {
    /// Parses a source: `hf://org/name[@revision][:file]`, `http(s)://...`, else a local path.
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(rest) = text.strip_prefix("hf://") {
            let (repo_rev, file) = match rest.split_once(':') {
                Some((a, f)) => (a, Some(f)),
                None => (rest, None),
            };
            let (repo, revision) = match repo_rev.split_once('@') {
                Some((r, v)) => (r, Some(v)),
                None => (repo_rev, None),
            };
            let parts: Vec<&str> = repo.split('/').collect();
            if parts.is_empty() || parts.len() > 2 || !parts.iter().all(|p| valid_repo_part(p)) {
                return Err(bad(
                    text,
                    "expected hf://org/name[@revision][:file] (letters, digits, - _ . in names)",
                ));
            }
            if revision.is_some_and(|r| r.is_empty() || r.contains("..")) {
                return Err(bad(text, "empty or invalid revision after @"));
            }
            if let Some(f) = file {
                if f.is_empty()
                    || f.starts_with('/')
                    || f.split('/').any(|p| p == ".." || p.is_empty())
                {
                    return Err(bad(text, "invalid file name after ':'"));
                }
            }
            return Ok(ModelSource::Hub {
                repo: repo.to_string(),
                revision: revision.map(str::to_string),
                file: file.map(str::to_string),
            });
        }
        if text.starts_with("https://") || text.starts_with("http://") {
            let name = text.rsplit('/').next().unwrap_or("");
            if name.is_empty() || text.split("://").nth(1).is_none_or(|r| !r.contains('/')) {
                return Err(bad(text, "a URL source must name a file"));
            }
            return Ok(ModelSource::Url {
                url: text.to_string(),
                sha256: None,
            });
        }
        if text.is_empty() {
            return Err(bad(text, "empty model source"));
        }
        Ok(ModelSource::Local(PathBuf::from(text)))
    }

    /// The same source with an expected sha256 (URL sources; ignored for others).
    pub fn with_sha256(self, expected: Option<String>) -> Result<Self> {
        match self {
            ModelSource::Url { url, .. } => {
                if let Some(h) = &expected {
                    if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                        return Err(bad(&url, "sha256 must be 64 hex digits"));
                    }
                }
                Ok(ModelSource::Url {
                    url,
                    sha256: expected.map(|h| h.to_ascii_lowercase()),
                })
            }
            other => Ok(other),
        }
    }

    pub fn is_remote(&self) -> bool {
        !matches!(self, ModelSource::Local(_))
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Local(p) => write!(f, "{}", p.display()),
            ModelSource::Hub {
                repo,
                revision,
                file,
            } => {
                write!(f, "hf://{repo}")?;
                if let Some(r) = revision {
                    write!(f, "@{r}")?;
                }
                if let Some(file) = file {
                    write!(f, ":{file}")?;
                }
                Ok(())
            }
            ModelSource::Url { url, .. } => write!(f, "{url}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_prints_it_back() {
        for text in [
            "hf://org/name",
            "hf://gpt2",
            "hf://org/name@main",
            "hf://org/name@0123456789abcdef0123456789abcdef01234567",
            "hf://org/name@refs/pr/1:sub/model.safetensors",
            "hf://org/name:model.pt",
            "https://example.com/releases/model.pt",
            "models/a.safetensors",
        ] {
            let s = ModelSource::parse(text).unwrap();
            assert_eq!(s.to_string(), text);
        }
        assert_eq!(
            ModelSource::parse("hf://org/name@v1:f.bin").unwrap(),
            ModelSource::Hub {
                repo: "org/name".into(),
                revision: Some("v1".into()),
                file: Some("f.bin".into())
            }
        );
        assert!(matches!(
            ModelSource::parse("x.pt").unwrap(),
            ModelSource::Local(_)
        ));
    }

    #[test]
    fn rejects_malformed_sources_with_the_culprit_named() {
        for text in [
            "hf://",
            "hf://a/b/c",
            "hf://org/na me",
            "hf://org/name@",
            "hf://org/name:",
            "hf://org/name:../x",
            "hf://org/name:/etc/passwd",
            "https://example.com",
            "https://example.com/",
            "",
        ] {
            let e = ModelSource::parse(text).unwrap_err().to_string();
            assert!(e.contains(text), "{e}");
        }
        let url = ModelSource::parse("https://h/x.pt").unwrap();
        assert!(url.clone().with_sha256(Some("abc".into())).is_err());
        let ok = url.with_sha256(Some("AB".repeat(32))).unwrap();
        assert_eq!(
            ok,
            ModelSource::Url {
                url: "https://h/x.pt".into(),
                sha256: Some("ab".repeat(32))
            }
        );
    }
}
