//! Remote sources against a Hub stand-in on 127.0.0.1 (the real Hub is unreachable): downloads
//! into the standard cache, offline use, pinned revisions, missing files, servers that hang or
//! cut bodies short, sharded repos, header-only inspection, URL sources with a sha256, and HTTPS
//! through a certificate authority only the configured bundle knows.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use soup_core::{ParamLayout, TensorSpec};
use soup_models::arch::clip::ClipClassifier;
use soup_models::checkpoint::write_safetensors;
use soup_models::remote::hub::{read_pem_bundle, Hub, HubConfig};
use soup_models::testkit::fixtures::{
    bits, random_zoo, tiny_clip_config, write_hf_clip_dir, ScratchDir,
};
use soup_models::testkit::hub::{sha256, Behaviour, HubServer};
use soup_models::{Architecture, Checkpoint, ModelSource};

const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";

fn config(server: &HubServer, dir: &Path) -> HubConfig {
    config_at(&server.url, dir)
}

fn config_at(endpoint: &str, dir: &Path) -> HubConfig {
    HubConfig {
        endpoint: endpoint.to_string(),
        cache: dir.join("hub"),
        url_cache: dir.join("urls"),
        token: None,
        offline: false,
        connect_timeout: Duration::from_secs(2),
        metadata_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(2),
        retries: 1,
        extra_roots: Vec::new(),
        progress: None,
    }
}

/// Two tiny CLIP models written as Hugging Face directories `v1/` and `v2/` under `dir`.
fn two_versions(dir: &Path) -> (ClipClassifier, Vec<Vec<Tensor>>) {
    let arch = ClipClassifier::new(tiny_clip_config(3, 4)).unwrap();
    let zoo = random_zoo(&arch, 2, 11).unwrap();
    for (i, params) in zoo.iter().enumerate() {
        write_hf_clip_dir(&dir.join(format!("v{}", i + 1)), &arch, params).unwrap();
    }
    (arch, zoo)
}

fn load(path: &Path) -> Vec<Tensor> {
    let ckpt = Checkpoint::open(path).unwrap();
    let arch = ckpt.architecture().unwrap();
    ckpt.load_params(arch.as_ref(), &Device::Cpu).unwrap()
}

fn source(text: &str) -> ModelSource {
    ModelSource::parse(text).unwrap()
}

/// A scratch directory with the two tiny models, a Hub stand-in serving `v1` as commit C1 of
/// `org/tiny` on main, and a fetcher that uses it.
struct Setup {
    dir: ScratchDir,
    arch: ClipClassifier,
    zoo: Vec<Vec<Tensor>>,
    server: HubServer,
    hub: Hub,
}

fn setup(label: &str, behaviour: Behaviour) -> Setup {
    let dir = ScratchDir::new(label);
    let (arch, zoo) = two_versions(dir.path());
    let server = HubServer::start(behaviour).unwrap();
    server
        .add_dir("org/tiny", "main", C1, &dir.path().join("v1"))
        .unwrap();
    let hub = Hub::new(config(&server, dir.path()));
    Setup {
        dir,
        arch,
        zoo,
        server,
        hub,
    }
}

#[test]
fn downloads_into_the_hub_cache_then_works_offline_and_pins_revisions() {
    let Setup {
        dir,
        arch,
        zoo,
        server,
        hub,
    } = setup("hub-cache", Behaviour::Normal);

    let got = hub.fetch(&source("hf://org/tiny")).unwrap();
    assert_eq!(got.commit.as_deref(), Some(C1));
    assert_eq!(bits(&load(&got.path)), bits(&zoo[0]));
    // The standard layout: blobs by etag, snapshot links, refs/main; hf-hub finds the files.
    let repo = dir.path().join("hub/models--org--tiny");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), C1);
    let weights = repo.join(format!("snapshots/{C1}/model.safetensors"));
    assert!(std::fs::symlink_metadata(&weights)
        .unwrap()
        .file_type()
        .is_symlink());
    let blob = std::fs::canonicalize(&weights).unwrap();
    let bytes = std::fs::read(&blob).unwrap();
    assert_eq!(blob.file_name().unwrap().to_str().unwrap(), sha256(&bytes));
    let via_hf_hub = hf_hub::Cache::new(dir.path().join("hub"))
        .model("org/tiny".into())
        .get("model.safetensors")
        .unwrap();
    assert_eq!(via_hf_hub, weights);

    // A new commit on main; the old one stays reachable by its hash.
    server
        .add_dir("org/tiny", "main", C2, &dir.path().join("v2"))
        .unwrap();
    let latest = hub.fetch(&source("hf://org/tiny@main")).unwrap();
    assert_eq!(latest.commit.as_deref(), Some(C2));
    assert_eq!(bits(&load(&latest.path)), bits(&zoo[1]));
    let pinned = hub.fetch(&source(&format!("hf://org/tiny@{C1}"))).unwrap();
    assert_eq!(bits(&load(&pinned.path)), bits(&zoo[0]));

    // Server gone, offline: both revisions come from the cache, with no request.
    server.stop();
    let mut offline = config(&server, dir.path());
    offline.offline = true;
    let hub = Hub::new(offline);
    let cached = hub.fetch(&source("hf://org/tiny")).unwrap();
    assert_eq!(cached.commit.as_deref(), Some(C2));
    assert_eq!(bits(&load(&cached.path)), bits(&zoo[1]));
    let cached = hub.fetch(&source(&format!("hf://org/tiny@{C1}:model.safetensors")));
    let file = Checkpoint::open(cached.unwrap().path).unwrap();
    let params = file.load_params(&arch, &Device::Cpu).unwrap();
    assert_eq!(bits(&params), bits(&zoo[0]));
    let miss = hub
        .fetch(&source("hf://org/other"))
        .unwrap_err()
        .to_string();
    assert!(
        miss.starts_with("hf://org/other: ") && miss.contains("HF_HUB_OFFLINE"),
        "{miss}"
    );
    assert!(!miss.contains('\n'));
}

#[test]
fn an_unreachable_hub_falls_back_to_the_cache_and_missing_things_are_named() {
    let Setup { server, hub, .. } = setup("hub-missing", Behaviour::Normal);
    let e = hub
        .fetch(&source("hf://org/tiny:nothing.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("hf://org/tiny:nothing.safetensors: no such file"),
        "{e}"
    );
    let e = hub
        .fetch(&source("hf://org/absent"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such repository"), "{e}");
    let e = hub
        .fetch(&source("hf://org/tiny@v9"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such revision"), "{e}");

    hub.fetch(&source("hf://org/tiny")).unwrap();
    server.stop();
    // Not offline, but nothing answers: the cached main is used.
    let again = hub.fetch(&source("hf://org/tiny")).unwrap();
    assert_eq!(again.commit.as_deref(), Some(C1));
}

#[test]
fn a_server_that_never_answers_fails_within_the_timeout() {
    let dir = ScratchDir::new("hub-hang");
    let server = HubServer::start(Behaviour::Hang).unwrap();
    let mut cfg = config(&server, dir.path());
    cfg.metadata_timeout = Duration::from_millis(500);
    cfg.read_timeout = Duration::from_millis(500);
    let hub = Hub::new(cfg);
    let t = Instant::now();
    let e = hub.fetch(&source("hf://org/tiny")).unwrap_err().to_string();
    // Two attempts of 0.5 s and a 0.25 s pause: far below this bound unless something hangs.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(e.contains("timed out") && e.contains("2 attempts"), "{e}");
    let e = hub
        .fetch(&source(&format!("{}/releases/m.pt", server.url)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("timed out"), "{e}");
}

#[test]
fn truncated_bodies_are_detected_and_never_cached_and_a_cut_download_resumes() {
    let Setup {
        dir,
        zoo,
        server,
        hub,
        ..
    } = setup("hub-trunc", Behaviour::Truncate);
    let e = hub.fetch(&source("hf://org/tiny")).unwrap_err().to_string();
    assert!(e.contains("truncated") && e.contains("not cached"), "{e}");
    let repo = dir.path().join("hub/models--org--tiny");
    let blobs: Vec<String> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        blobs.iter().all(|b| b.ends_with(".incomplete")),
        "{blobs:?}"
    );
    assert!(!repo.join(format!("snapshots/{C1}")).exists());

    // One cut body, then a well-behaved server: the download resumes with a range request.
    server.set_behaviour(Behaviour::TruncateOnce);
    let got = hub.fetch(&source("hf://org/tiny")).unwrap();
    assert_eq!(bits(&load(&got.path)), bits(&zoo[0]));
}

#[test]
fn sharded_repos_download_only_the_shards_the_classifier_needs() {
    let dir = ScratchDir::new("hub-shards");
    let arch = ClipClassifier::new(tiny_clip_config(3, 4)).unwrap();
    let params = random_zoo(&arch, 1, 5).unwrap().remove(0);
    let repo_dir = dir.path().join("sharded");
    write_hf_clip_dir(&repo_dir, &arch, &params).unwrap();
    std::fs::remove_file(repo_dir.join("model.safetensors")).unwrap();
    write_safetensors(
        &repo_dir.join("model-00001-of-00002.safetensors"),
        arch.layout(),
        &params,
        &BTreeMap::new(),
    )
    .unwrap();
    let text = Tensor::ones((10, 8), DType::F32, &Device::Cpu).unwrap();
    let text_name = "text_model.embeddings.token_embedding.weight";
    write_safetensors(
        &repo_dir.join("model-00002-of-00002.safetensors"),
        &ParamLayout::new(vec![TensorSpec {
            name: text_name.into(),
            shape: vec![10, 8],
        }]),
        &[text],
        &BTreeMap::new(),
    )
    .unwrap();
    let mut map = serde_json::Map::new();
    for t in &arch.layout().tensors {
        map.insert(t.name.clone(), "model-00001-of-00002.safetensors".into());
    }
    map.insert(text_name.into(), "model-00002-of-00002.safetensors".into());
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        repo_dir.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let server = HubServer::start(Behaviour::Normal).unwrap();
    server
        .add_dir("org/sharded", "main", C1, &repo_dir)
        .unwrap();
    let hub = Hub::new(config(&server, dir.path()));
    let got = hub.fetch(&source("hf://org/sharded")).unwrap();
    assert_eq!(bits(&load(&got.path)), bits(&params));
    let log = server.log().join("\n");
    assert!(log.contains("model-00001-of-00002"), "{log}");
    assert!(!log.contains("model-00002-of-00002"), "{log}");
}

#[test]
fn remote_inspection_reads_headers_only() {
    let Setup {
        dir,
        arch,
        server,
        hub,
        ..
    } = setup("hub-inspect", Behaviour::Normal);
    let remote = hub.open_remote(&source("hf://org/tiny")).unwrap();
    let local = Checkpoint::open(dir.path().join("v1")).unwrap();
    let a = remote.architecture().unwrap();
    assert_eq!(a.config(), arch.config());
    assert_eq!(
        remote.layout(a.as_ref()).unwrap(),
        local.layout(a.as_ref()).unwrap()
    );
    let name = &arch.layout().tensors[0].name;
    assert_eq!(remote.dtype(name).unwrap(), "F32");
    let e = remote.load(name, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("only the header"), "{e}");
    // The weights were not downloaded: two small range requests, no blob.
    let weights_len = std::fs::metadata(dir.path().join("v1/model.safetensors"))
        .unwrap()
        .len();
    let blobs = dir.path().join("hub/models--org--tiny/blobs");
    for b in std::fs::read_dir(blobs).unwrap() {
        assert!(b.unwrap().metadata().unwrap().len() < weights_len / 4);
    }
    assert_eq!(
        server
            .log()
            .iter()
            .filter(|l| l.starts_with("GET /cdn/"))
            .count(),
        2
    );
}

#[test]
fn url_sources_are_cached_and_checked_against_their_sha256() {
    let dir = ScratchDir::new("hub-url");
    let (_, zoo) = two_versions(dir.path());
    let bytes = std::fs::read(dir.path().join("v1/model.safetensors")).unwrap();
    let server = HubServer::start(Behaviour::Normal).unwrap();
    server.add_url("/releases/model.safetensors", bytes.clone());
    let url = format!("{}/releases/model.safetensors", server.url);
    let hub = Hub::new(config(&server, dir.path()));

    let wrong = source(&url).with_sha256(Some("0".repeat(64))).unwrap();
    let e = hub.fetch(&wrong).unwrap_err().to_string();
    assert!(
        e.contains("sha256 mismatch") && e.contains("not cached"),
        "{e}"
    );

    let right = source(&url).with_sha256(Some(sha256(&bytes))).unwrap();
    let got = hub.fetch(&right).unwrap();
    assert_eq!(got.sha256.as_deref(), Some(sha256(&bytes).as_str()));
    let ckpt = Checkpoint::open(&got.path).unwrap();
    let arch = ClipClassifier::new(tiny_clip_config(3, 4)).unwrap();
    assert_eq!(
        bits(&ckpt.load_params(&arch, &Device::Cpu).unwrap()),
        bits(&zoo[0])
    );
    // Cached: a second fetch makes no request.
    let before = server.log().len();
    hub.fetch(&right).unwrap();
    assert_eq!(server.log().len(), before);
}

#[test]
fn the_token_never_reaches_another_origin() {
    let Setup {
        dir, zoo, server, ..
    } = setup("hub-token", Behaviour::Normal);
    // The CDN is a second server: same host, another port, another origin.
    let cdn = HubServer::start(Behaviour::Normal).unwrap();
    cdn.add_dir("org/tiny", "main", C1, &dir.path().join("v1"))
        .unwrap();
    server.set_cdn(&cdn.url);
    let secret = "hf_secret_token_1234";
    let mut with_token = config(&server, dir.path());
    with_token.token = Some(secret.into());
    let hub = Hub::new(with_token);
    let got = hub.fetch(&source("hf://org/tiny")).unwrap();
    assert_eq!(bits(&load(&got.path)), bits(&zoo[0]));
    assert!(
        cdn.log().iter().any(|r| r.contains("/cdn/")),
        "the weights came from the CDN: {:?}",
        cdn.log()
    );
    assert!(
        cdn.authorized().is_empty(),
        "the token went to another origin: {:?}",
        cdn.authorized()
    );
    assert!(
        !server.authorized().is_empty(),
        "the endpoint itself gets the token"
    );
    // A URL source on another origin never gets it either, and errors never show it.
    cdn.add_url("/releases/m.safetensors", b"not what it claims".to_vec());
    let url = format!("{}/releases/m.safetensors", cdn.url);
    let wrong = ModelSource::parse(&url)
        .unwrap()
        .with_sha256(Some("0".repeat(64)))
        .unwrap();
    let err = hub.fetch(&wrong).unwrap_err().to_string();
    assert!(!err.contains(secret), "{err}");
    assert!(cdn.authorized().is_empty(), "{:?}", cdn.authorized());
}

#[test]
fn downloads_report_their_progress_to_the_caller() {
    use soup_models::remote::{Download, OnDownload};
    use std::sync::{Arc, Mutex};
    let dir = ScratchDir::new("hub-progress");
    let (_, _) = two_versions(dir.path());
    let server = HubServer::start(Behaviour::Normal).unwrap();
    server
        .add_dir("org/tiny", "main", C1, &dir.path().join("v1"))
        .unwrap();
    // (label, announced size, bytes advanced, ended whole)
    type Report = (String, Option<u64>, u64, bool);
    let seen: Arc<Mutex<Vec<Report>>> = Arc::default();
    let log = seen.clone();
    let on = OnDownload(Arc::new(move |d: Download| {
        let mut v = log.lock().unwrap();
        match d {
            Download::Start { label, size } => v.push((label.to_string(), size, 0, false)),
            Download::Advance(n) => v.last_mut().unwrap().2 += n,
            Download::End { complete } => v.last_mut().unwrap().3 = complete,
            Download::Size(s) => v.last_mut().unwrap().1 = Some(s),
            Download::Position(_) => {}
        }
    }));
    let hub = Hub::new(config(&server, dir.path())).with_progress(Some(on));
    let got = hub.fetch(&source("hf://org/tiny")).unwrap();
    let seen = seen.lock().unwrap();
    let weights = std::fs::metadata(got.path.join("model.safetensors"))
        .unwrap()
        .len();
    let entry = seen
        .iter()
        .find(|(label, ..)| label.contains("model.safetensors"))
        .unwrap_or_else(|| panic!("no report for the weights: {seen:?}"));
    assert_eq!(entry.1, Some(weights), "{seen:?}");
    assert_eq!(entry.2, weights, "{seen:?}");
    assert!(
        seen.iter().all(|e| e.3),
        "every download ends whole: {seen:?}"
    );
}

/// The test certificate authority's directory (made once by `golden/tls/make_tls.sh`).
fn tls_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tls")
}

/// An HTTPS server on 127.0.0.1 whose certificate the test authority signed, as a TLS-inspecting
/// proxy's is: it answers every request with `body`. Returns its address and a count of the
/// connections it accepted.
fn https_server(body: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let chain = vec![CertificateDer::from_pem_file(tls_dir().join("server.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(tls_dir().join("server.key")).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(
            rustls::crypto::ring::default_provider().into(),
        )
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, stream);
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            // A failed handshake (an untrusting client) ends this connection only.
            while !request.ends_with(b"\r\n\r\n") {
                match tls.read(&mut byte) {
                    Ok(1) => request.push(byte[0]),
                    _ => break,
                }
            }
            if request.ends_with(b"\r\n\r\n") {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(head.as_bytes());
                let _ = tls.write_all(&body);
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        }
    });
    (url, accepted)
}

#[test]
fn https_works_through_a_configured_authority_and_an_untrusted_one_is_named_at_once() {
    use std::sync::atomic::Ordering;
    let dir = ScratchDir::new("hub-tls");
    let body = b"bytes behind a TLS-inspecting proxy".to_vec();
    let (base, accepted) = https_server(body.clone());
    let url = format!("{base}/releases/model.safetensors");

    // Mozilla's roots alone do not know the authority: a clear error after one connection
    // (a certificate error is not retried) that says what to do.
    let mut cfg = config_at(&base, dir.path());
    cfg.retries = 3;
    let e = Hub::new(cfg).fetch(&source(&url)).unwrap_err().to_string();
    assert!(
        e.contains("UnknownIssuer") && e.contains("SSL_CERT_FILE"),
        "{e}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // With the authority's bundle (as SSL_CERT_FILE or the system bundle gives it), it works.
    let mut cfg = config_at(&base, dir.path());
    cfg.extra_roots = read_pem_bundle(&tls_dir().join("ca.pem")).unwrap();
    assert_eq!(cfg.extra_roots.len(), 1);
    let got = Hub::new(cfg)
        .fetch(&source(&url).with_sha256(Some(sha256(&body))).unwrap())
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), body);

    // A bundle that holds no certificate is refused, not silently empty.
    let e = read_pem_bundle(&tls_dir().join("make_tls.sh")).unwrap_err();
    assert!(e.contains("no PEM certificate"), "{e}");
    assert!(read_pem_bundle(&dir.path().join("missing.pem")).is_err());
}
