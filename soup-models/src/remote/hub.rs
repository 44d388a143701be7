//! Remote model sources (cargo feature `hub`): Hugging Face Hub repositories through the Hub's
//! `resolve` protocol, and files at plain URLs.
//!
//! Downloads land in the standard Hub cache (`blobs/<etag>`, `snapshots/<commit>/<file>` links,
//! `refs/<branch>`), the layout `huggingface_hub` and the `hf-hub` crate share; `hf-hub` names
//! the repository folders, reads refs and writes them. The HTTP is soup's own, on the `ureq`
//! client that `hf-hub` uses, because `hf-hub`'s client cannot be given timeouts: every call here
//! has connect and read timeouts and bounded retries, so a server that never answers ends in an
//! error, never a hang. A download is written to `<blob>.incomplete`, resumed with a range
//! request after a dropped connection, checked against the size the server announced and the
//! etag (sha256 for LFS files, git's blob sha1 for others), and only then renamed into the cache.
//!
//! Environment: `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN` (else `$HF_HOME/token`),
//! `HF_HUB_OFFLINE=1` (cache only; a miss is an error), `HF_HUB_ETAG_TIMEOUT` (seconds for a
//! metadata request, default 10), `HF_HUB_DOWNLOAD_TIMEOUT` (seconds without a byte before a
//! download fails, default 10), `SOUP_HUB_RETRIES` (default 3), `SOUP_CACHE` (URL downloads,
//! default `~/.cache/soup`), `SSL_CERT_FILE` (a PEM bundle of trust anchors; see
//! [`HubConfig::extra_roots`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::{Cache, Repo, RepoType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::checkpoint::{ignored, Checkpoint};
use crate::error::{ModelError, Result};
use crate::remote::source::{ModelSource, Resolved};
use crate::remote::{Download, OnDownload};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The largest safetensors header read remotely (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;
/// Where Linux distributions and macOS keep the system's trust anchors as one PEM bundle.
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Settings of the remote fetcher; [`HubConfig::from_env`] reads them as `huggingface_hub` does.
#[derive(Clone, Debug)]
pub struct HubConfig {
    pub endpoint: String,
    /// The Hub cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache: PathBuf,
    /// Where URL downloads are kept (`$SOUP_CACHE/urls`, else `~/.cache/soup/urls`).
    pub url_cache: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
    pub connect_timeout: Duration,
    /// Whole-request limit of a metadata (HEAD or header) request.
    pub metadata_timeout: Duration,
    /// Longest wait for the next bytes of a download.
    pub read_timeout: Duration,
    /// Retries after a failed request (network errors, 5xx, 429, truncated bodies).
    pub retries: u32,
    /// Trust anchors for HTTPS besides Mozilla's (`webpki-roots`): the PEM bundle `SSL_CERT_FILE`
    /// names, else the system's bundle where there is one, so that a TLS-inspecting proxy whose
    /// certificate authority the system trusts works as it does for curl and pip.
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Receives download progress ([`Download`]); none by default: the library never prints,
    /// the `soup` binary draws bars from these reports unless `--quiet`.
    pub progress: Option<OnDownload>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn env_seconds(name: &str, default: f64) -> Result<Duration> {
    let Some(v) = env(name) else {
        return Ok(Duration::from_secs_f64(default));
    };
    match v.parse::<f64>() {
        Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
        _ => Err(ModelError::source(
            name,
            format!("{v:?} is not a positive number of seconds"),
        )),
    }
}

impl HubConfig {
    pub fn from_env() -> Result<Self> {
        let home = env("HOME").map(PathBuf::from);
        let cache_root = || -> Result<PathBuf> {
            env("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".cache")))
                .ok_or_else(|| {
                    ModelError::source("HOME", "not set, and neither HF_HOME nor HF_HUB_CACHE is")
                })
        };
        let hf_home = match env("HF_HOME") {
            Some(h) => PathBuf::from(h),
            None => cache_root()?.join("huggingface"),
        };
        let cache = env("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let url_cache = match env("SOUP_CACHE") {
            Some(c) => PathBuf::from(c),
            None => cache_root()?.join("soup"),
        }
        .join("urls");
        let token = env("HF_TOKEN").or_else(|| Cache::new(hf_home.join("hub")).token());
        let offline = env("HF_HUB_OFFLINE")
            .is_some_and(|v| ["1", "true", "yes", "on"].contains(&v.to_ascii_lowercase().as_str()));
        let retries = match env("SOUP_HUB_RETRIES") {
            None => 3,
            Some(v) => v.parse().map_err(|_| {
                ModelError::source("SOUP_HUB_RETRIES", format!("{v:?} is not a count"))
            })?,
        };
        Ok(Self {
            endpoint: env("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
                .trim_end_matches('/')
                .to_string(),
            cache,
            url_cache,
            token,
            offline,
            connect_timeout: env_seconds("HF_HUB_ETAG_TIMEOUT", 10.0)?,
            metadata_timeout: env_seconds("HF_HUB_ETAG_TIMEOUT", 10.0)?,
            read_timeout: env_seconds("HF_HUB_DOWNLOAD_TIMEOUT", 10.0)?,
            retries,
            extra_roots: match env("SSL_CERT_FILE") {
                Some(file) => read_pem_bundle(Path::new(&file))
                    .map_err(|e| ModelError::source("SSL_CERT_FILE", e))?,
                None => SYSTEM_BUNDLES
                    .iter()
                    .map(Path::new)
                    .find(|p| p.is_file())
                    .and_then(|p| read_pem_bundle(p).ok())
                    .unwrap_or_default(),
            },
            progress: None,
        })
    }
}

/// The certificates of a PEM bundle; an error when it cannot be read or holds none.
pub fn read_pem_bundle(path: &Path) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(&e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| fail(&e))?;
    if certs.is_empty() {
        return Err(fail(&"no PEM certificate in it"));
    }
    Ok(certs)
}

/// TLS settings: Mozilla's roots plus `extra` (the ones rustls cannot parse are skipped).
fn tls_config(extra: &[CertificateDer<'static>]) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    roots.add_parsable_certificates(extra.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
    .expect("ring's default provider supports TLS 1.2 and 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// Why a request failed. `Network` failures fall back to the cache when it has the file.
#[derive(Debug)]
enum RequestError {
    NotFound(String),
    Network(String),
    Other(String),
}

impl RequestError {
    fn message(self) -> String {
        match self {
            RequestError::NotFound(m) | RequestError::Network(m) | RequestError::Other(m) => m,
        }
    }
}

/// The outcome of a request.
type Request<T> = std::result::Result<T, RequestError>;

/// Where and what a Hub file is, from its `resolve` metadata.
#[derive(Debug)]
struct FileMeta {
    commit: String,
    etag: String,
    size: u64,
    /// Where its bytes are (the CDN location for LFS files).
    url: String,
}

/// The remote fetcher: one HTTP agent with timeouts, and the cache.
pub struct Hub {
    pub config: HubConfig,
    agent: ureq::Agent,
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Whether `url` has the origin (scheme, host, port) of `endpoint`: the only requests that may
/// carry the Hub token, as huggingface_hub does. A look-alike host (`huggingface.co.example.net`),
/// another port, a redirect to a CDN or a URL source never see it.
fn same_origin(url: &str, endpoint: &str) -> bool {
    match (::url::Url::parse(url), ::url::Url::parse(endpoint)) {
        (Ok(a), Ok(b)) => a.origin().is_tuple() && a.origin() == b.origin(),
        _ => false,
    }
}

/// `location` (absolute, or absolute-path) against `base`.
fn join_url(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_string();
    }
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    if location.starts_with('/') {
        format!("{}{location}", &base[..host_end])
    } else {
        let dir_end = base
            .rfind('/')
            .filter(|&i| i >= host_end)
            .unwrap_or(host_end);
        format!("{}/{location}", &base[..dir_end])
    }
}

fn io_fail(path: &Path, e: std::io::Error) -> RequestError {
    RequestError::Other(format!("{}: {e}", path.display()))
}

/// The sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    digest_file(path, &ring::digest::SHA256, None)
}

/// A digest of a file's bytes, with git's `blob <len>\0` prefix when `git_len` is given.
fn digest_file(
    path: &Path,
    algorithm: &'static ring::digest::Algorithm,
    git_len: Option<u64>,
) -> std::io::Result<String> {
    let mut ctx = ring::digest::Context::new(algorithm);
    if let Some(len) = git_len {
        ctx.update(format!("blob {len}\0").as_bytes());
    }
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish().as_ref()))
}

/// Lower-case hexadecimal of `bytes` (digests as the Hub and sha256sum write them).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Hub {
    pub fn new(config: HubConfig) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(config.connect_timeout)
            .timeout_read(config.read_timeout)
            .timeout_write(config.read_timeout)
            .redirects(0)
            .tls_config(tls_config(&config.extra_roots))
            .try_proxy_from_env(true)
            .user_agent(concat!("soup/", env!("CARGO_PKG_VERSION")))
            .build();
        Self { config, agent }
    }

    pub fn from_env() -> Result<Self> {
        Ok(Self::new(HubConfig::from_env()?))
    }

    pub fn with_progress(mut self, progress: Option<OnDownload>) -> Self {
        self.config.progress = progress;
        self
    }

    /// Fetches a remote source into the cache; local sources pass through.
    pub fn fetch(&self, source: &ModelSource) -> Result<Resolved> {
        let label = source.to_string();
        let fail = |f: RequestError| ModelError::source(&label, f.message());
        match source {
            ModelSource::Local(path) => Ok(Resolved {
                source: label.clone(),
                path: path.clone(),
                commit: None,
                sha256: None,
            }),
            ModelSource::Hub {
                repo,
                revision,
                file,
            } => {
                let revision = revision.as_deref().unwrap_or("main");
                let (path, commit) = match file {
                    Some(f) => self.fetch_file(repo, revision, f).map_err(fail)?,
                    None => self.fetch_repo(repo, revision).map_err(fail)?,
                };
                Ok(Resolved {
                    source: label.clone(),
                    path,
                    commit: Some(commit),
                    sha256: None,
                })
            }
            ModelSource::Url { url, sha256 } => {
                let (path, digest) = self.fetch_url(url, sha256.as_deref()).map_err(fail)?;
                Ok(Resolved {
                    source: label.clone(),
                    path,
                    commit: None,
                    sha256: Some(digest),
                })
            }
        }
    }

    fn cache_repo(&self, repo: &str, revision: &str) -> hf_hub::CacheRepo {
        Cache::new(self.config.cache.clone()).repo(Repo::with_revision(
            repo.to_string(),
            RepoType::Model,
            revision.to_string(),
        ))
    }

    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.config
            .cache
            .join(Repo::new(repo.to_string(), RepoType::Model).folder_name())
    }

    /// The cached copy of `file` at `revision` (a branch through its ref, or a commit).
    fn cached(&self, repo: &str, revision: &str, file: &str) -> Option<(PathBuf, String)> {
        if is_commit(revision) {
            let path = self
                .repo_dir(repo)
                .join("snapshots")
                .join(revision)
                .join(file);
            return path.exists().then(|| (path, revision.to_string()));
        }
        let path = self.cache_repo(repo, revision).get(file)?;
        let commit = path.parent()?.ancestors().find_map(|p| {
            let name = p.file_name()?.to_str()?;
            is_commit(name).then(|| name.to_string())
        })?;
        Some((path, commit))
    }

    /// One request with the retry policy; redirects are returned, not followed.
    fn call(
        &self,
        method: &str,
        url: &str,
        range: Option<&str>,
        deadline: Option<Duration>,
    ) -> Request<ureq::Response> {
        let mut attempt = 0;
        loop {
            let mut req = self
                .agent
                .request(method, url)
                .set("Accept-Encoding", "identity");
            if let Some(token) = &self.config.token {
                if same_origin(url, &self.config.endpoint) {
                    req = req.set("Authorization", &format!("Bearer {token}"));
                }
            }
            if let Some(r) = range {
                req = req.set("Range", r);
            }
            if let Some(d) = deadline {
                req = req.timeout(d);
            }
            let failure = match req.call() {
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(code, r)) => {
                    let what = r.header("X-Error-Code").unwrap_or("").to_string();
                    match code {
                        // Only a missing file is `NotFound` (callers try other names); a
                        // missing repository or revision ends the fetch.
                        404 => {
                            return Err(match what.as_str() {
                                "RepoNotFound" | "RepositoryNotFound" => RequestError::Other(format!(
                                    "no such repository, or it is private (HTTP 404 from {url})"
                                )),
                                "RevisionNotFound" => {
                                    RequestError::Other(format!("no such revision (HTTP 404 from {url})"))
                                }
                                _ => RequestError::NotFound(format!("no such file (HTTP 404 from {url})")),
                            });
                        }
                        401 | 403 => {
                            return Err(RequestError::Other(format!(
                                "access denied (HTTP {code} from {url}); a gated or private repository needs HF_TOKEN"
                            )))
                        }
                        429 | 500..=599 => RequestError::Network(format!("HTTP {code} from {url}")),
                        _ => return Err(RequestError::Other(format!("HTTP {code} from {url}"))),
                    }
                }
                Err(ureq::Error::Transport(t)) => {
                    let timed_out = std::error::Error::source(&t)
                        .and_then(|s| s.downcast_ref::<std::io::Error>())
                        .is_some_and(|e| {
                            matches!(
                                e.kind(),
                                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                            )
                        })
                        || t.to_string().contains("timed out");
                    let untrusted = t.to_string().contains("certificate");
                    if untrusted {
                        // Not transient: no retries (a cached copy may still serve).
                        return Err(RequestError::Network(format!(
                            "{t}; if a proxy inspects TLS here, point SSL_CERT_FILE at a PEM bundle \
                             holding its certificate authority"
                        )));
                    } else if timed_out {
                        let limit = deadline.unwrap_or(self.config.read_timeout);
                        RequestError::Network(format!(
                            "{url}: no answer within {:.1} s (timed out)",
                            limit.as_secs_f64()
                        ))
                    } else {
                        RequestError::Network(t.to_string())
                    }
                }
            };
            if attempt >= self.config.retries {
                let RequestError::Network(m) = failure else {
                    return Err(failure);
                };
                let tries = attempt + 1;
                return Err(RequestError::Network(format!(
                    "{m} ({tries} attempt{})",
                    if tries == 1 { "" } else { "s" }
                )));
            }
            std::thread::sleep(Duration::from_millis(250 << attempt.min(5)));
            attempt += 1;
        }
    }

    /// A request with redirects followed (up to 10).
    fn follow(&self, method: &str, url: &str, range: Option<&str>) -> Request<ureq::Response> {
        let mut url = url.to_string();
        for _ in 0..10 {
            let r = self.call(method, &url, range, None)?;
            if !(300..400).contains(&r.status()) {
                return Ok(r);
            }
            let location = r.header("Location").ok_or_else(|| {
                RequestError::Other(format!("{url}: redirect without a Location"))
            })?;
            url = join_url(&url, location);
        }
        Err(RequestError::Other(format!("{url}: too many redirects")))
    }

    fn resolve_url(&self, repo: &str, revision: &str, file: &str) -> String {
        format!(
            "{}/{repo}/resolve/{}/{file}",
            self.config.endpoint,
            revision.replace('/', "%2F")
        )
    }

    /// The `resolve` metadata of a file: HEAD, following relative redirects (renamed repos)
    /// only; an absolute redirect points at the bytes (a CDN) and carries the metadata itself.
    fn file_meta(&self, repo: &str, revision: &str, file: &str) -> Request<FileMeta> {
        let mut url = self.resolve_url(repo, revision, file);
        for _ in 0..10 {
            let r = self.call("HEAD", &url, None, Some(self.config.metadata_timeout))?;
            let location = r.header("Location").map(str::to_string);
            let redirect = (300..400).contains(&r.status());
            if redirect {
                let location = location.as_deref().ok_or_else(|| {
                    RequestError::Other(format!("{url}: redirect without a Location"))
                })?;
                if location.starts_with('/') {
                    url = join_url(&url, location);
                    continue;
                }
            }
            let header = |name: &str| -> Request<String> {
                r.header(name).map(str::to_string).ok_or_else(|| {
                    RequestError::Other(format!(
                        "{url}: the answer has no {name} header (is HF_ENDPOINT a Hub?)"
                    ))
                })
            };
            let commit = header("X-Repo-Commit")?;
            let etag = match r.header("X-Linked-Etag") {
                Some(e) => e.to_string(),
                None => header("ETag")?,
            };
            let etag = etag.trim_start_matches("W/").trim_matches('"').to_string();
            let size = match r.header("X-Linked-Size") {
                Some(s) => s.to_string(),
                None => header("Content-Length")?,
            };
            let size = size
                .parse()
                .map_err(|_| RequestError::Other(format!("{url}: bad size {size:?}")))?;
            if !is_commit(&commit) {
                return Err(RequestError::Other(format!("{url}: bad commit {commit:?}")));
            }
            let target = match (redirect, location) {
                (true, Some(l)) => join_url(&url, &l),
                _ => url,
            };
            return Ok(FileMeta {
                commit,
                etag,
                size,
                url: target,
            });
        }
        Err(RequestError::Other(format!("{url}: too many redirects")))
    }

    fn offline_miss(&self, what: &str) -> RequestError {
        RequestError::NotFound(format!(
            "{what} is not in the cache {} and HF_HUB_OFFLINE is set",
            self.config.cache.display()
        ))
    }

    /// One file of a Hub repository: from the cache when the revision is a cached commit or
    /// the Hub is offline (or unreachable and the file cached), else downloaded and checked.
    /// Returns the snapshot path and the commit.
    pub fn fetch_file_path(
        &self,
        repo: &str,
        revision: &str,
        file: &str,
    ) -> Result<(PathBuf, String)> {
        self.fetch_file(repo, revision, file)
            .map_err(|f| ModelError::source(&format!("hf://{repo}@{revision}:{file}"), f.message()))
    }

    fn fetch_file(&self, repo: &str, revision: &str, file: &str) -> Request<(PathBuf, String)> {
        if self.config.offline || is_commit(revision) {
            if let Some(hit) = self.cached(repo, revision, file) {
                return Ok(hit);
            }
            if self.config.offline {
                return Err(self.offline_miss(file));
            }
        }
        let meta = match self.file_meta(repo, revision, file) {
            Ok(m) => m,
            Err(RequestError::Network(m)) => {
                if let Some(hit) = self.cached(repo, revision, file) {
                    tracing::warn!("{m}; using the cached {file} of commit {}", hit.1);
                    return Ok(hit);
                }
                return Err(RequestError::Network(m));
            }
            Err(e) => return Err(e),
        };
        let dir = self.repo_dir(repo);
        let snapshot = dir.join("snapshots").join(&meta.commit).join(file);
        let safe_etag: String = meta
            .etag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let blob = dir.join("blobs").join(safe_etag);
        let blob_ok = std::fs::metadata(&blob).is_ok_and(|m| m.len() == meta.size);
        if !blob_ok {
            self.download(&meta.url, Some(meta.size), &blob, file, |tmp| {
                verify_etag(tmp, &meta.etag, meta.size)
            })?;
        }
        link(&blob, &snapshot).map_err(|e| io_fail(&snapshot, e))?;
        if revision != meta.commit {
            self.cache_repo(repo, revision)
                .create_ref(&meta.commit)
                .map_err(|e| io_fail(&dir, e))?;
        }
        Ok((snapshot, meta.commit))
    }

    /// A whole model repository: `config.json` when there is one, and the weights (a sharded
    /// index and the shards holding vision tensors, `model.safetensors`, or
    /// `pytorch_model.bin`), all at one commit. Returns the snapshot directory and the commit.
    fn fetch_repo(&self, repo: &str, revision: &str) -> Request<(PathBuf, String)> {
        let mut commit: Option<String> = None;
        let mut at = revision.to_string();
        match self.fetch_file(repo, &at, "config.json") {
            Ok((_, c)) => {
                at = c.clone();
                commit = Some(c);
            }
            Err(RequestError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let candidates = [
            "model.safetensors.index.json",
            "model.safetensors",
            "pytorch_model.bin",
        ];
        // Files of a commit never change: weights cached for it are used without asking the
        // Hub which names it has (which also serves an unreachable Hub).
        let cached_first = candidates
            .iter()
            .position(|c| is_commit(&at) && self.cached(repo, &at, c).is_some());
        for candidate in candidates.iter().skip(cached_first.unwrap_or(0)).copied() {
            let (path, c) = match self.fetch_file(repo, &at, candidate) {
                Ok(hit) => hit,
                Err(RequestError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            if candidate.ends_with(".index.json") {
                for shard in needed_shards(&path)? {
                    self.fetch_file(repo, &c, &shard)?;
                }
            }
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            if commit.as_ref().is_some_and(|first| *first != c) {
                return Err(RequestError::Other(format!(
                    "the repository moved from commit {} to {c} while fetching",
                    commit.unwrap_or_default()
                )));
            }
            return Ok((dir, c));
        }
        Err(RequestError::NotFound(if self.config.offline {
            format!(
                "no model.safetensors(.index.json) or pytorch_model.bin of revision {revision} in the cache and HF_HUB_OFFLINE is set"
            )
        } else {
            format!(
                "revision {revision} has no model.safetensors(.index.json) or pytorch_model.bin (name a file with hf://{repo}:FILE)"
            )
        }))
    }

    /// A file at a URL, kept in the URL cache under a name derived from the URL; `expected`
    /// (sha256 hex) is checked on download and on every later use of the cached copy.
    fn fetch_url(&self, url: &str, expected: Option<&str>) -> Request<(PathBuf, String)> {
        let key = ring::digest::digest(&ring::digest::SHA256, url.as_bytes());
        let key = hex(&key.as_ref()[..8]);
        let name = url
            .rsplit('/')
            .next()
            .unwrap_or("download")
            .split(['?', '#'])
            .next()
            .unwrap_or("download");
        let path = self.config.url_cache.join(key).join(name);
        let sidecar = path.with_file_name(format!("{name}.sha256"));
        if path.exists() {
            if let Ok(known) = std::fs::read_to_string(&sidecar) {
                let known = known.trim().to_string();
                match expected {
                    Some(e) if e != known => {}
                    _ => return Ok((path, known)),
                }
            }
        }
        if self.config.offline {
            return Err(self.offline_miss(url));
        }
        let expected_owned = expected.map(str::to_string);
        self.download(url, None, &path, name, |tmp| match &expected_owned {
            Some(e) => {
                let got = sha256_file(tmp).map_err(|err| err.to_string())?;
                if &got == e {
                    Ok(())
                } else {
                    Err(format!("sha256 mismatch: expected {e}, got {got}"))
                }
            }
            None => Ok(()),
        })?;
        let digest = sha256_file(&path).map_err(|e| io_fail(&path, e))?;
        std::fs::write(&sidecar, &digest).map_err(|e| io_fail(&sidecar, e))?;
        Ok((path, digest))
    }

    /// Downloads `url` to `dest` through `dest.incomplete`: resumed with a range request after a
    /// dropped connection (bounded retries), checked for the announced size and by `check`,
    /// renamed into place only when whole. A bad download is removed, never used.
    fn download(
        &self,
        url: &str,
        mut size: Option<u64>,
        dest: &Path,
        label: &str,
        check: impl Fn(&Path) -> std::result::Result<(), String>,
    ) -> Request<()> {
        let parent = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| io_fail(parent, e))?;
        let tmp = PathBuf::from(format!("{}.incomplete", dest.display()));
        self.report(Download::Start { label, size });
        let mut attempt = 0;
        loop {
            let have = std::fs::metadata(&tmp).map_or(0, |m| m.len());
            let have = if size.is_some_and(|s| have > s) {
                0
            } else {
                have
            };
            if size == Some(have) && have > 0 {
                break;
            }
            let range = (have > 0).then(|| format!("bytes={have}-"));
            let r = self.follow("GET", url, range.as_deref())?;
            let resumed = r.status() == 206 && have > 0;
            let announced = r
                .header("Content-Length")
                .and_then(|v| v.parse::<u64>().ok());
            if size.is_none() && !resumed {
                size = announced;
                if let Some(s) = size {
                    self.report(Download::Size(s));
                }
            }
            let mut out = if resumed {
                std::fs::OpenOptions::new().append(true).open(&tmp)
            } else {
                File::create(&tmp)
            }
            .map_err(|e| io_fail(&tmp, e))?;
            let start = if resumed { have } else { 0 };
            self.report(Download::Position(start));
            let copied = copy_body(r.into_reader(), &mut out, &|n| {
                self.report(Download::Advance(n))
            });
            out.flush().map_err(|e| io_fail(&tmp, e))?;
            let now = std::fs::metadata(&tmp).map_or(0, |m| m.len());
            let complete = match size {
                Some(s) => now == s,
                None => copied.is_ok(),
            };
            if complete {
                break;
            }
            let why = match (&copied, size) {
                (Err(e), Some(s)) => format!("{e} after {now} of {s} bytes"),
                (Err(e), None) => format!("{e} after {now} bytes"),
                (Ok(_), Some(s)) => format!("the body ended after {now} of {s} bytes"),
                (Ok(_), None) => unreachable!("an unsized body that ends is complete"),
            };
            if attempt >= self.config.retries {
                self.report(Download::End { complete: false });
                return Err(RequestError::Network(format!(
                    "{url}: download truncated: {why}; not cached ({} attempts)",
                    attempt + 1
                )));
            }
            tracing::warn!("{url}: {why}; resuming");
            std::thread::sleep(Duration::from_millis(250 << attempt.min(5)));
            attempt += 1;
        }
        self.report(Download::End { complete: true });
        if let Err(why) = check(&tmp) {
            let _ = std::fs::remove_file(&tmp);
            return Err(RequestError::Other(format!(
                "{url}: corrupt download ({why}); removed, not cached"
            )));
        }
        std::fs::rename(&tmp, dest).map_err(|e| io_fail(dest, e))
    }

    /// Passes `d` to the caller's progress receiver, if any.
    fn report(&self, d: Download) {
        if let Some(on) = &self.config.progress {
            (on.0)(d);
        }
    }

    /// A checkpoint of a remote source that reads only what `soup inspect` needs: config.json,
    /// the sharded index and the safetensors headers (two range requests per file). Sources
    /// that are not safetensors are fetched whole.
    pub fn open_remote(&self, source: &ModelSource) -> Result<Checkpoint> {
        let label = source.to_string();
        let fail = |f: RequestError| ModelError::source(&label, f.message());
        let ModelSource::Hub {
            repo,
            revision,
            file,
        } = source
        else {
            return Checkpoint::open(self.fetch(source)?.path);
        };
        let revision = revision.as_deref().unwrap_or("main");
        let path = PathBuf::from(&label);
        match file {
            Some(f) if f.ends_with(".safetensors") => {
                let (header, _) = self.remote_header(repo, revision, f).map_err(fail)?;
                Checkpoint::from_headers(path, None, vec![(PathBuf::from(f), header)], None)
            }
            Some(_) => Checkpoint::open(self.fetch(source)?.path),
            None => {
                let (config, at) = match self.fetch_file(repo, revision, "config.json") {
                    Ok((p, c)) => (Some(p), c),
                    Err(RequestError::NotFound(_)) => (None, revision.to_string()),
                    Err(e) => return Err(fail(e)),
                };
                let hf_config = match &config {
                    Some(p) => Some(crate::checkpoint::read_json(p)?),
                    None => None,
                };
                match self.fetch_file(repo, &at, "model.safetensors.index.json") {
                    Ok((index, c)) => {
                        let map = weight_map(&index).map_err(fail)?;
                        let mut headers = Vec::new();
                        for shard in needed_shards(&index).map_err(fail)? {
                            let (h, _) = self.remote_header(repo, &c, &shard).map_err(fail)?;
                            headers.push((PathBuf::from(shard), h));
                        }
                        return Checkpoint::from_headers(path, hf_config, headers, Some(map));
                    }
                    Err(RequestError::NotFound(_)) => {}
                    Err(e) => return Err(fail(e)),
                }
                match self.remote_header(repo, &at, "model.safetensors") {
                    Ok((h, _)) => Checkpoint::from_headers(
                        path,
                        hf_config,
                        vec![(PathBuf::from("model.safetensors"), h)],
                        None,
                    ),
                    Err(RequestError::NotFound(_)) => Checkpoint::open(self.fetch(source)?.path),
                    Err(e) => Err(fail(e)),
                }
            }
        }
    }

    /// The header of a remote safetensors file (length prefix included): read from the cached
    /// file when there is one, else by two range requests.
    fn remote_header(&self, repo: &str, revision: &str, file: &str) -> Request<(Vec<u8>, String)> {
        if self.config.offline || is_commit(revision) {
            if let Some((path, commit)) = self.cached(repo, revision, file) {
                return Ok((read_header_file(&path)?, commit));
            }
            if self.config.offline {
                return Err(self.offline_miss(file));
            }
        }
        let meta = self.file_meta(repo, revision, file)?;
        let prefix = self.range(&meta.url, 0, 8)?;
        let n = u64::from_le_bytes(prefix.as_slice().try_into().map_err(|_| {
            RequestError::Other(format!("{file}: shorter than a safetensors header"))
        })?);
        if n > MAX_HEADER || 8 + n > meta.size {
            return Err(RequestError::Other(format!(
                "{file}: not a safetensors file (header length {n})"
            )));
        }
        let mut header = prefix;
        header.extend(self.range(&meta.url, 8, n)?);
        Ok((header, meta.commit))
    }

    /// `len` bytes of `url` from `start`, by a range request.
    fn range(&self, url: &str, start: u64, len: u64) -> Request<Vec<u8>> {
        let r = self.follow(
            "GET",
            url,
            Some(&format!("bytes={start}-{}", start + len - 1)),
        )?;
        if r.status() != 206 {
            return Err(RequestError::Other(format!(
                "{url}: the server ignored a range request (HTTP {})",
                r.status()
            )));
        }
        let mut buf = Vec::with_capacity(len as usize);
        r.into_reader()
            .take(len)
            .read_to_end(&mut buf)
            .map_err(|e| RequestError::Network(format!("{url}: {e}")))?;
        if buf.len() as u64 != len {
            return Err(RequestError::Network(format!(
                "{url}: range request truncated ({} of {len} bytes)",
                buf.len()
            )));
        }
        Ok(buf)
    }
}

fn read_header_file(path: &Path) -> Request<Vec<u8>> {
    let mut f = File::open(path).map_err(|e| io_fail(path, e))?;
    let mut prefix = [0u8; 8];
    f.read_exact(&mut prefix).map_err(|e| io_fail(path, e))?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER {
        return Err(RequestError::Other(format!(
            "{}: not a safetensors file",
            path.display()
        )));
    }
    let mut header = prefix.to_vec();
    f.take(n)
        .read_to_end(&mut header)
        .map_err(|e| io_fail(path, e))?;
    Ok(header)
}

/// Copies a response body, telling `advance` how many bytes each read brought.
fn copy_body(mut body: impl Read, out: &mut File, advance: &dyn Fn(u64)) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        total += n as u64;
        advance(n as u64);
    }
}

/// Checks a download against its etag: sha256 for LFS files (64 hex digits), git's blob sha1
/// for others (40 hex digits); other etags are not content hashes and are not checked.
fn verify_etag(path: &Path, etag: &str, size: u64) -> std::result::Result<(), String> {
    let etag = etag.to_ascii_lowercase();
    let got = if is_hex(&etag, 64) {
        digest_file(path, &ring::digest::SHA256, None)
    } else if is_hex(&etag, 40) {
        digest_file(path, &ring::digest::SHA1_FOR_LEGACY_USE_ONLY, Some(size))
    } else {
        return Ok(());
    }
    .map_err(|e| e.to_string())?;
    if got == etag {
        Ok(())
    } else {
        Err(format!("content hash {got} does not match the etag {etag}"))
    }
}

/// Links `snapshot` to `blob` (a relative symlink, as the Hub cache does; a copy where links
/// are not available).
fn link(blob: &Path, snapshot: &Path) -> std::io::Result<()> {
    let parent = snapshot.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    if snapshot.exists() {
        return Ok(());
    }
    let _ = std::fs::remove_file(snapshot);
    #[cfg(unix)]
    {
        // snapshots/<commit>/<file...> → ../../blobs/<etag>, one more .. per directory in file.
        let repo_dir = blob
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."));
        let depth = snapshot
            .strip_prefix(repo_dir)
            .map(|p| p.components().count() - 1)
            .unwrap_or(2);
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(target, snapshot)
    }
    #[cfg(not(unix))]
    {
        std::fs::copy(blob, snapshot).map(|_| ())
    }
}

fn weight_map(index: &Path) -> Request<BTreeMap<String, String>> {
    let json =
        crate::checkpoint::read_json(index).map_err(|e| RequestError::Other(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| RequestError::Other(format!("{}: no weight_map object", index.display())))?;
    map.iter()
        .map(|(k, v)| {
            let f = v.as_str().filter(|f| !f.contains('/') && !f.contains(".."));
            f.map(|f| (k.clone(), f.to_string())).ok_or_else(|| {
                RequestError::Other(format!("{}: bad shard name for {k}", index.display()))
            })
        })
        .collect()
}

/// The shards of a sharded index that hold tensors an image classifier uses (a CLIPModel's
/// text tower shards are skipped).
fn needed_shards(index: &Path) -> Request<BTreeSet<String>> {
    Ok(weight_map(index)?
        .into_iter()
        .filter(|(name, _)| !ignored(name))
        .map(|(_, shard)| shard)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_only_to_the_endpoint_origin() {
        let hub = "https://huggingface.co";
        assert!(same_origin("https://huggingface.co/api/models/x", hub));
        assert!(same_origin("https://HuggingFace.co:443/x", hub));
        for other in [
            "https://huggingface.co.example.net/x",
            "https://huggingface.com/x",
            "http://huggingface.co/x",
            "https://huggingface.co:8443/x",
            "https://evil@example.net/huggingface.co",
            "https://cdn-lfs.huggingface.co/x",
            "not a url",
        ] {
            assert!(!same_origin(other, hub), "{other}");
        }
        assert!(same_origin(
            "http://127.0.0.1:8080/a",
            "http://127.0.0.1:8080"
        ));
        assert!(!same_origin(
            "http://127.0.0.1:8081/a",
            "http://127.0.0.1:8080"
        ));
    }

    #[test]
    fn joins_redirect_locations() {
        let base = "http://127.0.0.1:8/org/m/resolve/main/model.safetensors";
        assert_eq!(join_url(base, "https://cdn/x"), "https://cdn/x");
        assert_eq!(
            join_url(base, "/api/resolve-cache/x"),
            "http://127.0.0.1:8/api/resolve-cache/x"
        );
        assert_eq!(
            join_url(base, "other.bin"),
            "http://127.0.0.1:8/org/m/resolve/main/other.bin"
        );
    }

    #[test]
    fn etags_are_checked_as_sha256_or_git_sha1() {
        let dir = crate::testkit::fixtures::ScratchDir::new("etag");
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello\n").unwrap();
        // `git hash-object` of "hello\n" and `sha256sum` of the same bytes.
        let git = "ce013625030ba8dba906f756967f9e9ca394464a";
        let sha = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        assert!(verify_etag(&path, git, 6).is_ok());
        assert!(verify_etag(&path, sha, 6).is_ok());
        assert!(verify_etag(&path, &sha.replace('5', "6"), 6).is_err());
        assert!(verify_etag(&path, &git.replace('c', "d"), 6).is_err());
        assert!(verify_etag(&path, "abc-weak", 6).is_ok());
    }
}
