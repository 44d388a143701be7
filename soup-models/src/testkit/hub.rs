//! A Hugging Face Hub stand-in on 127.0.0.1 for tests (the real Hub is unreachable here): the
//! `resolve` layout with `X-Repo-Commit`, `ETag`/`X-Linked-Etag`, `X-Linked-Size`, lengths and
//! range requests; LFS files (weights) redirect to a CDN path as the Hub does. It can also
//! misbehave on purpose: accept connections and never answer, or cut bodies short.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::remote::hub::hex;

/// How the server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Normal,
    /// Reads each request and never answers.
    Hang,
    /// Announces the full length of every GET body and sends half of it.
    Truncate,
    /// Truncates the next GET body only, then behaves normally.
    TruncateOnce,
}

#[derive(Default)]
struct State {
    /// repo → branch → commit.
    branches: HashMap<String, HashMap<String, String>>,
    /// (repo, commit) → file → bytes.
    commits: HashMap<(String, String), BTreeMap<String, Vec<u8>>>,
    /// LFS blobs by sha256, and plain files by URL path.
    blobs: HashMap<String, Vec<u8>>,
    urls: HashMap<String, Vec<u8>>,
    log: Vec<String>,
    /// Requests that carried an `Authorization` header, as `METHOD /path`.
    authorized: Vec<String>,
    /// Where LFS redirects point (another server: another origin); this server by default.
    cdn: Option<String>,
}

pub struct HubServer {
    /// `http://127.0.0.1:PORT`, the value for `HF_ENDPOINT`.
    pub url: String,
    state: Arc<Mutex<State>>,
    behaviour: Arc<Mutex<Behaviour>>,
    stop: Arc<AtomicBool>,
}

pub fn sha256(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// git's blob id of `data` (the Hub's ETag of a non-LFS file).
pub fn git_sha1(data: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(format!("blob {}\0", data.len()).as_bytes());
    ctx.update(data);
    hex(ctx.finish().as_ref())
}

fn is_lfs(file: &str) -> bool {
    [".safetensors", ".bin", ".pt", ".pth"]
        .iter()
        .any(|e| file.ends_with(e))
}

impl HubServer {
    pub fn start(behaviour: Behaviour) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = Self {
            url: url.clone(),
            state: Arc::default(),
            behaviour: Arc::new(Mutex::new(behaviour)),
            stop: Arc::default(),
        };
        let (state, behaviour, stop) = (
            server.state.clone(),
            server.behaviour.clone(),
            server.stop.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (state, behaviour, stop, url) =
                    (state.clone(), behaviour.clone(), stop.clone(), url.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &state, &behaviour, &stop, &url);
                });
            }
        });
        Ok(server)
    }

    pub fn set_behaviour(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    /// Publishes `files` as commit `commit` of `repo`, and points `branch` at it.
    pub fn add_commit(
        &self,
        repo: &str,
        branch: &str,
        commit: &str,
        files: Vec<(String, Vec<u8>)>,
    ) {
        let mut s = self.state.lock().unwrap();
        let mut map = BTreeMap::new();
        for (name, data) in files {
            if is_lfs(&name) {
                s.blobs.insert(sha256(&data), data.clone());
            }
            map.insert(name, data);
        }
        s.commits.insert((repo.into(), commit.into()), map);
        s.branches
            .entry(repo.into())
            .or_default()
            .insert(branch.into(), commit.into());
    }

    /// Publishes every file of directory `dir` (not recursive) as `commit` on `branch`.
    pub fn add_dir(
        &self,
        repo: &str,
        branch: &str,
        commit: &str,
        dir: &Path,
    ) -> std::io::Result<()> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_file() {
                let name = path.file_name().unwrap().to_string_lossy().to_string();
                files.push((name, std::fs::read(&path)?));
            }
        }
        self.add_commit(repo, branch, commit, files);
        Ok(())
    }

    /// Serves `data` at `path` (e.g. `/releases/model.pt`) as a plain file.
    pub fn add_url(&self, path: &str, data: Vec<u8>) {
        self.state.lock().unwrap().urls.insert(path.into(), data);
    }

    /// Points the redirects of LFS files at `base` (e.g. a second server's URL: a CDN on
    /// another origin, which must never see the token).
    pub fn set_cdn(&self, base: &str) {
        self.state.lock().unwrap().cdn = Some(base.to_string());
    }

    /// The requests so far that carried an `Authorization` header, as `METHOD /path`.
    pub fn authorized(&self) -> Vec<String> {
        self.state.lock().unwrap().authorized.clone()
    }

    /// Every request so far, as `METHOD /path`.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn stop(&self) {
        if !self.stop.swap(true, Ordering::SeqCst) {
            let addr = self.url.trim_start_matches("http://").to_string();
            let _ = TcpStream::connect(addr);
        }
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn reply(status: u16, headers: Vec<(&str, String)>, body: Vec<u8>) -> Reply {
    Reply {
        status,
        headers: headers
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        body,
    }
}

fn not_found(code: &str) -> Reply {
    reply(
        404,
        vec![("X-Error-Code", code.into())],
        b"not found".to_vec(),
    )
}

fn route(state: &Mutex<State>, path: &str, base: &str) -> Reply {
    let s = state.lock().unwrap();
    if let Some(sha) = path.strip_prefix("/cdn/") {
        return match s.blobs.get(sha) {
            Some(data) => reply(200, vec![("ETag", format!("\"{sha}\""))], data.clone()),
            None => not_found("EntryNotFound"),
        };
    }
    if let Some(data) = s.urls.get(path) {
        return reply(200, vec![], data.clone());
    }
    // /{org}/{name}/resolve/{revision}/{file...} (or /{name}/resolve/...).
    let Some((repo, rest)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return not_found("EntryNotFound");
    };
    let Some((revision, file)) = rest.split_once('/') else {
        return not_found("EntryNotFound");
    };
    let revision = revision.replace("%2F", "/");
    let Some(branches) = s.branches.get(repo) else {
        return not_found("RepoNotFound");
    };
    let commit = branches.get(&revision).cloned().unwrap_or(revision);
    let Some(files) = s.commits.get(&(repo.to_string(), commit.clone())) else {
        return not_found("RevisionNotFound");
    };
    let Some(data) = files.get(file) else {
        return not_found("EntryNotFound");
    };
    if is_lfs(file) {
        let sha = sha256(data);
        return reply(
            302,
            vec![
                (
                    "Location",
                    format!("{}/cdn/{sha}", s.cdn.as_deref().unwrap_or(base)),
                ),
                ("X-Repo-Commit", commit),
                ("X-Linked-Etag", format!("\"{sha}\"")),
                ("X-Linked-Size", data.len().to_string()),
                ("ETag", "\"pointer\"".into()),
            ],
            Vec::new(),
        );
    }
    reply(
        200,
        vec![
            ("X-Repo-Commit", commit),
            ("ETag", format!("\"{}\"", git_sha1(data))),
        ],
        data.clone(),
    )
}

fn serve(
    conn: TcpStream,
    state: &Mutex<State>,
    behaviour: &Mutex<Behaviour>,
    stop: &AtomicBool,
    base: &str,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut range = None;
    let mut authorized = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
            if k.eq_ignore_ascii_case("authorization") {
                authorized = true;
            }
        }
    }
    let mut parts = request.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    {
        let mut s = state.lock().unwrap();
        s.log.push(format!("{method} {path}"));
        if authorized {
            s.authorized.push(format!("{method} {path}"));
        }
    }
    let mode = *behaviour.lock().unwrap();
    if mode == Behaviour::Hang {
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        return Ok(());
    }
    let mut r = route(state, &path, base);
    let total = r.body.len();
    let mut status = r.status;
    if status == 200 {
        if let Some(spec) = range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
            let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
            let start: usize = a.parse().unwrap_or(0);
            let end: usize = b
                .parse()
                .map_or(total.saturating_sub(1), |e: usize| e.min(total - 1));
            if start < total && start <= end {
                r.headers.push((
                    "Content-Range".into(),
                    format!("bytes {start}-{end}/{total}"),
                ));
                r.body = r.body[start..=end].to_vec();
                status = 206;
            }
        }
    }
    let mut out = conn;
    let mut head = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", r.body.len()));
    out.write_all(head.as_bytes())?;
    if method == "HEAD" {
        return out.flush();
    }
    let cut = matches!(mode, Behaviour::Truncate | Behaviour::TruncateOnce) && r.body.len() > 1;
    if cut {
        if mode == Behaviour::TruncateOnce {
            *behaviour.lock().unwrap() = Behaviour::Normal;
        }
        out.write_all(&r.body[..r.body.len() / 2])?;
        out.flush()?;
        return out.shutdown(std::net::Shutdown::Both);
    }
    out.write_all(&r.body)?;
    out.flush()
}
