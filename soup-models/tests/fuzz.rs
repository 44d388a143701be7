//! Loader fuzzing on stable Rust: byte mutations and truncations of valid files of every format
//! soup reads (safetensors, sharded indexes, Hugging Face directories, `.pt` zips, idx, CIFAR,
//! PNG and JPEG image folders). Every case must end in `Ok` or `Err`: never a panic, and never
//! an allocation larger than the file justifies (the test binary's allocator records the
//! largest request made while a loader runs).
//!
//! Cases per format: `SOUP_FUZZ_CASES` (default 2000; `cargo xtask ci` runs the default).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use soup_core::{ParamLayout, TensorSpec};
use soup_models::arch::clip::ClipClassifier;
use soup_models::checkpoint::gguf::Gguf;
use soup_models::checkpoint::smollm2;
use soup_models::checkpoint::write_safetensors;
use soup_models::data::{DataSpec, Split};
use soup_models::testkit::fixtures::{
    self, random_zoo, tiny_clip_config, write_hf_clip_dir, ScratchDir,
};
use soup_models::{Architecture, Checkpoint};

/// The system allocator, recording the largest single request while `WATCH` is set.
struct Watching;

static WATCH: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping is two
// atomics and allocates nothing.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Watching = Watching;

/// One loader run at a time (the allocator's record is global).
static SERIAL: Mutex<()> = Mutex::new(());

fn cases() -> u32 {
    std::env::var("SOUP_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// The largest allocation a file of `len` bytes justifies: its bytes expanded by deflate's
/// maximum ratio, or a fixed floor for the decoded images and model tensors of these tiny
/// fixtures.
fn justified(len: usize) -> usize {
    (len * 1032).max(64 << 20)
}

/// Runs `load` with the allocator watching; fails on a panic or an oversized allocation.
fn guarded(len: usize, load: impl FnOnce()) -> std::result::Result<(), TestCaseError> {
    guarded_within(justified(len), len, load)
}

/// [`guarded`] with the largest allocation allowed given: an image file declares its size,
/// and a tiny PNG may rightly decode to megabytes, so images are held to the decoder's limit.
fn guarded_within(
    bound: usize,
    len: usize,
    load: impl FnOnce(),
) -> std::result::Result<(), TestCaseError> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    LARGEST.store(0, Ordering::SeqCst);
    WATCH.store(true, Ordering::SeqCst);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load));
    WATCH.store(false, Ordering::SeqCst);
    let largest = LARGEST.load(Ordering::SeqCst);
    if let Err(panic) = outcome {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        return Err(TestCaseError::fail(format!("panicked: {what}")));
    }
    prop_assert!(
        largest <= bound,
        "allocated {largest} bytes for a file of {len}"
    );
    Ok(())
}

/// A mutation of a file: truncate, overwrite bytes, or both.
#[derive(Clone, Debug)]
struct Mutation {
    truncate: Option<usize>,
    writes: Vec<(usize, u8)>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        proptest::option::weighted(0.3, any::<usize>()),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
    )
        .prop_map(|(truncate, writes)| Mutation { truncate, writes })
}

impl Mutation {
    /// Applies to `bytes`; positions are taken modulo the length, biased to the first 512
    /// bytes (headers) half of the time.
    fn apply(&self, bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        for &(at, v) in &self.writes {
            if out.is_empty() {
                break;
            }
            let span = if at % 2 == 0 {
                out.len().min(512)
            } else {
                out.len()
            };
            let i = (at / 2) % span;
            out[i] = v;
        }
        if let Some(t) = self.truncate {
            out.truncate(t % (bytes.len() + 1));
        }
        out
    }
}

fn tiny() -> (ClipClassifier, Vec<Tensor>) {
    let arch = ClipClassifier::new(tiny_clip_config(3, 4)).unwrap();
    let params = random_zoo(&arch, 1, 7).unwrap().remove(0);
    (arch, params)
}

/// Everything a loader can be asked of a checkpoint, errors ignored.
fn exercise_checkpoint(path: &Path) {
    let Ok(ckpt) = Checkpoint::open(path) else {
        return;
    };
    let _ = ckpt.metadata();
    let names: Vec<String> = ckpt.names().map(str::to_string).collect();
    for n in &names {
        let _ = ckpt.shape(n);
        let _ = ckpt.dtype(n);
        let _ = ckpt.load(n, &Device::Cpu);
    }
    if let Ok(arch) = ckpt.architecture() {
        let _ = ckpt.layout(arch.as_ref());
        let _ = ckpt.load_params(arch.as_ref(), &Device::Cpu);
    }
}

/// Valid files, made once: (name, bytes) per format.
struct Fixtures {
    _dir: ScratchDir,
    safetensors: Vec<u8>,
    shard_index: Vec<u8>,
    shards: Vec<(String, Vec<u8>)>,
    hf_config: Vec<u8>,
    hf_weights: Vec<u8>,
    pt: Vec<u8>,
    idx_images: Vec<u8>,
    idx_labels: Vec<u8>,
    cifar: Vec<u8>,
    png: Vec<u8>,
    jpeg: Vec<u8>,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let dir = ScratchDir::new("fuzz-fixtures");
        let (arch, params) = tiny();
        let read = |p: PathBuf| std::fs::read(p).unwrap();
        let single = dir.path().join("single.safetensors");
        let mut meta = soup_models::checkpoint::arch_metadata(&arch);
        meta.insert("soup.note".into(), "fuzz".into());
        write_safetensors(&single, arch.layout(), &params, &meta).unwrap();

        let sharded = dir.path().join("sharded");
        std::fs::create_dir_all(&sharded).unwrap();
        let specs = &arch.layout().tensors;
        let half = specs.len() / 2;
        let mut weight_map = serde_json::Map::new();
        let mut shards = Vec::new();
        for (k, range) in [0..half, half..specs.len()].into_iter().enumerate() {
            let file = format!("model-0000{}-of-00002.safetensors", k + 1);
            let part: Vec<TensorSpec> = specs[range.clone()].to_vec();
            for s in &part {
                weight_map.insert(s.name.clone(), file.clone().into());
            }
            let meta = if k == 0 {
                soup_models::checkpoint::arch_metadata(&arch)
            } else {
                BTreeMap::new()
            };
            write_safetensors(
                &sharded.join(&file),
                &ParamLayout::new(part),
                &params[range],
                &meta,
            )
            .unwrap();
            shards.push((file.clone(), read(sharded.join(&file))));
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string();

        let hf = dir.path().join("hf");
        write_hf_clip_dir(&hf, &arch, &params).unwrap();
        let pt = dir.path().join("m.pt");
        soup_models::testkit::fixtures::write_openai_pt(&pt, &arch, &params).unwrap();

        // idx: 6 images of 4 × 4, labels 0..3.
        let mut idx_images = vec![0, 0, 8, 3, 0, 0, 0, 6, 0, 0, 0, 4, 0, 0, 0, 4];
        idx_images.extend((0..96).map(|v| (v * 7 % 256) as u8));
        let mut idx_labels = vec![0, 0, 8, 1, 0, 0, 0, 6];
        idx_labels.extend([0u8, 1, 2, 0, 1, 2]);
        // CIFAR-10: 3 records.
        let cifar: Vec<u8> = (0..3)
            .flat_map(|r| {
                std::iter::once(r as u8).chain((0..3072).map(move |v| ((v + r) % 251) as u8))
            })
            .collect();
        let img =
            image::RgbImage::from_fn(9, 7, |x, y| image::Rgb([x as u8 * 20, y as u8 * 30, 99]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let mut jpeg = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
        Fixtures {
            safetensors: read(single),
            shard_index: index.into_bytes(),
            shards,
            hf_config: read(hf.join("config.json")),
            hf_weights: read(hf.join("model.safetensors")),
            pt: read(pt),
            idx_images,
            idx_labels,
            cifar,
            png,
            jpeg,
            _dir: dir,
        }
    })
}

/// Runs `cases()` mutations of `fixture` through `check`.
fn fuzz(name: &str, check: impl Fn(&Mutation) -> std::result::Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&mutation(), |m| check(&m));
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

#[test]
fn mutated_safetensors_files_are_errors_not_panics() {
    let f = fixtures();
    let dir = ScratchDir::new("fuzz-st");
    let path = dir.path().join("m.safetensors");
    fuzz("safetensors", |m| {
        let bytes = m.apply(&f.safetensors);
        std::fs::write(&path, &bytes).unwrap();
        guarded(bytes.len(), || exercise_checkpoint(&path))
    });
}

#[test]
fn mutated_sharded_checkpoints_are_errors_not_panics() {
    let f = fixtures();
    let dir = ScratchDir::new("fuzz-shard");
    fuzz("sharded", |m| {
        // The mutation hits the index, or one shard.
        let which = m.writes.first().map_or(0, |w| w.1 as usize % 3);
        let index = if which == 0 {
            m.apply(&f.shard_index)
        } else {
            f.shard_index.clone()
        };
        std::fs::write(dir.path().join("model.safetensors.index.json"), &index).unwrap();
        let mut len = index.len();
        for (k, (file, bytes)) in f.shards.iter().enumerate() {
            let bytes = if which == k + 1 {
                m.apply(bytes)
            } else {
                bytes.clone()
            };
            len += bytes.len();
            std::fs::write(dir.path().join(file), &bytes).unwrap();
        }
        guarded(len, || exercise_checkpoint(dir.path()))
    });
}

#[test]
fn mutated_hf_directories_are_errors_not_panics() {
    let f = fixtures();
    let dir = ScratchDir::new("fuzz-hf");
    fuzz("hf dir", |m| {
        let config_hit = m.writes.first().is_some_and(|w| w.1 % 2 == 0);
        let (config, weights) = if config_hit {
            (m.apply(&f.hf_config), f.hf_weights.clone())
        } else {
            (f.hf_config.clone(), m.apply(&f.hf_weights))
        };
        std::fs::write(dir.path().join("config.json"), &config).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &weights).unwrap();
        guarded(config.len() + weights.len(), || {
            exercise_checkpoint(dir.path())
        })
    });
}

#[test]
fn mutated_pt_zips_and_pickles_are_errors_not_panics() {
    let f = fixtures();
    let dir = ScratchDir::new("fuzz-pt");
    let path = dir.path().join("m.pt");
    // The pickle inside the zip is stored uncompressed: mutations reach its opcodes.
    fuzz("pt", |m| {
        let bytes = m.apply(&f.pt);
        std::fs::write(&path, &bytes).unwrap();
        guarded(bytes.len(), || exercise_checkpoint(&path))
    });
}

/// Every split of the data set at `root`, errors ignored.
fn exercise_data(root: &Path) {
    let spec = DataSpec::new(root.to_str().unwrap());
    for split in [Split::Train, Split::Heldout, Split::Test] {
        if let Ok(raw) = spec.load(split) {
            let arch = ClipClassifier::new(tiny_clip_config(3, 4)).unwrap();
            let _ = soup_models::data::prepare(&raw, &arch.image_input().unwrap(), &Device::Cpu);
        }
    }
}

/// Writes idx image and label files for both splits into `dir` (`suffix` "" or ".gz").
fn write_idx(dir: &Path, images: &[u8], labels: &[u8], suffix: &str) {
    for prefix in ["train", "t10k"] {
        std::fs::write(
            dir.join(format!("{prefix}-images-idx3-ubyte{suffix}")),
            images,
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{prefix}-labels-idx1-ubyte{suffix}")),
            labels,
        )
        .unwrap();
    }
}

#[test]
fn mutated_idx_files_are_errors_not_panics() {
    let f = fixtures();
    let dir = ScratchDir::new("fuzz-idx");
    fuzz("idx", |m| {
        let labels_hit = m.writes.first().is_some_and(|w| w.1 % 3 == 0);
        let (images, labels) = if labels_hit {
            (f.idx_images.clone(), m.apply(&f.idx_labels))
        } else {
            (m.apply(&f.idx_images), f.idx_labels.clone())
        };
        write_idx(dir.path(), &images, &labels, "");
        guarded(images.len() + labels.len(), || exercise_data(dir.path()))
    });
}

#[test]
fn mutated_gzip_idx_files_are_errors_not_panics() {
    let f = fixtures();
    let dir = ScratchDir::new("fuzz-idx-gz");
    let gz = |b: &[u8]| {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    };
    let (images, labels) = (gz(&f.idx_images), gz(&f.idx_labels));
    fuzz("idx.gz", |m| {
        let images = m.apply(&images);
        write_idx(dir.path(), &images, &labels, ".gz");
        guarded(images.len() + labels.len(), || exercise_data(dir.path()))
    });
}

#[test]
fn mutated_cifar_files_are_errors_not_panics() {
    let f = fixtures();
    let dir = ScratchDir::new("fuzz-cifar");
    fuzz("cifar", |m| {
        let bytes = m.apply(&f.cifar);
        for i in 1..=5 {
            std::fs::write(dir.path().join(format!("data_batch_{i}.bin")), &bytes).unwrap();
        }
        std::fs::write(dir.path().join("test_batch.bin"), &bytes).unwrap();
        guarded(6 * bytes.len(), || exercise_data(dir.path()))
    });
}

#[test]
fn mutated_png_and_jpeg_image_folders_are_errors_not_panics() {
    let f = fixtures();
    let dir = ScratchDir::new("fuzz-images");
    fuzz("image folder", |m| {
        let png = m.apply(&f.png);
        let jpeg = m.apply(&f.jpeg);
        for (split, class) in [("train", "a"), ("train", "b"), ("val", "a")] {
            let d = dir.path().join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("x.png"), &png).unwrap();
            std::fs::write(d.join("y.jpg"), &jpeg).unwrap();
        }
        // The decoded image, and its resized copies, within the decoder's limit.
        let bound = 2 * soup_models::data::MAX_IMAGE_BYTES as usize;
        guarded_within(bound, png.len() + jpeg.len(), || exercise_data(dir.path()))
    });
}

/// The fixtures themselves load: the mutations start from valid files.
/// GGUF files (the small one of `tests/golden/smollm2/`, with F32, F16, Q8_0 and Q4_1 tensors
/// and a tokenizer): opened, every tensor dequantised, the configuration and tokenizer read.
#[test]
fn mutated_gguf_files_are_errors_not_panics() {
    let bytes = std::fs::read(fixtures::golden("smollm2", "tiny.gguf")).unwrap();
    let dir = ScratchDir::new("fuzz-gguf");
    let path = dir.path().join("m.gguf");
    fuzz("gguf", |m| {
        let b = m.apply(&bytes);
        std::fs::write(&path, &b).unwrap();
        guarded(b.len(), || {
            if let Ok(g) = Gguf::open(&path) {
                for name in g.names() {
                    let _ = g.tensor(name);
                }
                let _ = smollm2::llama_config(&g);
                let _ = smollm2::tokenizer_json(&g);
            }
        })
    });
}

#[test]
fn the_unmutated_fixtures_load() {
    let f = fixtures();
    let dir = ScratchDir::new("fuzz-valid");
    let path = dir.path().join("m.safetensors");
    std::fs::write(&path, &f.safetensors).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    let arch = ckpt.architecture().unwrap();
    assert_eq!(
        ckpt.load_params(arch.as_ref(), &Device::Cpu).unwrap().len(),
        arch.layout().len()
    );
    let pt = dir.path().join("m.pt");
    std::fs::write(&pt, &f.pt).unwrap();
    let ckpt = Checkpoint::open(&pt).unwrap();
    let arch = ckpt.architecture().unwrap();
    ckpt.load_params(arch.as_ref(), &Device::Cpu).unwrap();
    write_idx(dir.path(), &f.idx_images, &f.idx_labels, "");
    assert_eq!(
        DataSpec::new(dir.path().to_str().unwrap())
            .load(Split::Test)
            .unwrap()
            .len(),
        6
    );
    image::load_from_memory(&f.png).unwrap();
    image::load_from_memory(&f.jpeg).unwrap();
}

// The hostile files of issue 13, one by one: each was a panic or an abort before.

fn named(arch: &ClipClassifier, params: &[Tensor]) -> BTreeMap<String, Tensor> {
    arch.layout()
        .tensors
        .iter()
        .zip(params)
        .map(|(s, t)| (s.name.clone(), t.clone()))
        .collect()
}

/// Writes a stored zip holding `data.pkl` = `pickle` (plus the usual version file).
fn write_pt_with_pickle(path: &Path, pickle: &[u8]) {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/version", options).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

/// The pickle inside a valid `.pt` fixture.
fn fixture_pickle() -> Vec<u8> {
    use std::io::Read;
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(fixtures().pt.clone())).unwrap();
    let mut pickle = Vec::new();
    zip.by_name("archive/data.pkl")
        .unwrap()
        .read_to_end(&mut pickle)
        .unwrap();
    pickle
}

#[test]
fn a_scalar_head_in_a_config_json_directory_is_an_error() {
    let (arch, params) = tiny();
    let dir = ScratchDir::new("hostile-head");
    write_hf_clip_dir(dir.path(), &arch, &params).unwrap();
    let mut specs = arch.layout().tensors.clone();
    let mut tensors = params.clone();
    let head = specs
        .iter()
        .position(|s| s.name == "classification_head.weight")
        .unwrap();
    specs[head].shape = vec![];
    tensors[head] = Tensor::new(1f32, &Device::Cpu).unwrap();
    write_safetensors(
        &dir.path().join("model.safetensors"),
        &ParamLayout::new(specs),
        &tensors,
        &BTreeMap::new(),
    )
    .unwrap();
    let err = Checkpoint::open(dir.path())
        .unwrap()
        .architecture()
        .unwrap_err()
        .to_string();
    assert!(err.contains("classification_head.weight"), "{err}");
}

#[test]
fn an_openai_pt_with_a_scalar_conv1_is_an_error() {
    let (arch, params) = tiny();
    let dir = ScratchDir::new("hostile-conv");
    let mut tensors =
        soup_models::testkit::torch::to_openai("model.visual.", 2, &named(&arch, &params)).unwrap();
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("conv1.weight") {
            *t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        }
    }
    let path = dir.path().join("m.pt");
    soup_models::testkit::torch::write_torch_state_dict(&path, &tensors).unwrap();
    let err = Checkpoint::open(&path)
        .unwrap()
        .architecture()
        .unwrap_err()
        .to_string();
    assert!(err.contains("conv1.weight"), "{err}");
    // The error names the file that lies.
    assert!(err.starts_with(&format!("{}: ", path.display())), "{err}");
}

#[test]
fn a_config_json_that_cannot_be_built_is_named_in_the_error() {
    let (arch, params) = tiny();
    let dir = ScratchDir::new("hostile-config");
    soup_models::testkit::fixtures::write_hf_clip_dir(dir.path(), &arch, &params).unwrap();
    let config = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["vision_config"]["num_attention_heads"] = 5.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let err = Checkpoint::open(dir.path())
        .unwrap()
        .architecture()
        .unwrap_err()
        .to_string();
    assert!(err.starts_with(&format!("{}: ", config.display())), "{err}");
    assert!(err.contains("num_attention_heads"), "{err}");
}

#[test]
fn pickles_cut_short_anywhere_are_errors() {
    let pickle = fixture_pickle();
    let dir = ScratchDir::new("hostile-cut");
    let path = dir.path().join("m.pt");
    // Every cut inside the first tensor's `_rebuild_tensor_v2` call and storage tuple, and a
    // sample beyond.
    let cuts = (0..pickle.len().min(400)).chain((400..pickle.len()).step_by(97));
    for cut in cuts {
        write_pt_with_pickle(&path, &pickle[..cut]);
        guarded(cut, || {
            let _ = Checkpoint::open(&path).map(|c| c.architecture());
        })
        .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
    }
}

#[test]
fn a_pickle_declaring_a_4_gib_string_is_refused_before_allocating() {
    let dir = ScratchDir::new("hostile-bomb");
    let path = dir.path().join("m.pt");
    let mut pickle = vec![0x80, 2, b'X'];
    pickle.extend(u32::MAX.to_le_bytes());
    pickle.extend(b"abc.");
    write_pt_with_pickle(&path, &pickle);
    guarded(pickle.len(), || {
        let err = Checkpoint::open(&path).unwrap_err().to_string();
        assert!(err.contains("declares"), "{err}");
    })
    .unwrap();
}

#[test]
fn degenerate_data_sets_are_errors() {
    let dir = ScratchDir::new("hostile-data");
    // idx headers whose dimensions overflow, and 0 × 0 images.
    for (n, h, w) in [
        (u32::MAX, u32::MAX, u32::MAX),
        (3, 0, 0),
        (1 << 31, 1 << 16, 1 << 16),
    ] {
        let mut images = vec![0, 0, 8, 3];
        for v in [n, h, w] {
            images.extend(v.to_be_bytes());
        }
        images.extend([0u8; 64]);
        write_idx(dir.path(), &images, &[0, 0, 8, 1, 0, 0, 0, 3, 0, 1, 2], "");
        guarded(images.len(), || {
            DataSpec::new(dir.path().to_str().unwrap())
                .load(Split::Test)
                .unwrap_err();
        })
        .unwrap_or_else(|e| panic!("{n} × {h} × {w}: {e}"));
    }
    // An ImageFolder with a single training image: nothing to hold out.
    let folder = ScratchDir::new("hostile-one-image");
    let class = folder.path().join("train/a");
    std::fs::create_dir_all(&class).unwrap();
    std::fs::write(class.join("x.png"), &fixtures().png).unwrap();
    let err = DataSpec::new(folder.path().to_str().unwrap())
        .load(Split::Train)
        .unwrap_err()
        .to_string();
    assert!(err.contains("too few"), "{err}");
}

#[test]
fn configs_with_zero_sizes_are_errors() {
    let mlp = serde_json::json!({"input": [1, 4, 4], "hidden": [8, 0], "num_classes": 3});
    let err = soup_models::build("mlp", &mlp).unwrap_err().to_string();
    assert!(err.contains("hidden widths"), "{err}");
    for (key, value) in [
        ("hidden_size", 0),
        ("image_size", 0),
        ("num_hidden_layers", 0),
    ] {
        let mut clip = serde_json::json!({"hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_channels": 1,
            "image_size": 16, "patch_size": 4, "projection_dim": 8, "num_classes": 3});
        clip[key] = value.into();
        let err = soup_models::build("clip-vit", &clip)
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
}

/// A pickle whose opcodes are all well-formed but whose `_rebuild_tensor_v2` call gets too few
/// arguments (candle's reader panics on it): an error naming the file.
#[test]
fn a_well_formed_pickle_with_short_rebuild_arguments_is_an_error() {
    let dir = ScratchDir::new("hostile-short-args");
    let path = dir.path().join("m.pt");
    let mut pickle = vec![0x80, 2];
    pickle.extend(b"ccollections\nOrderedDict\n)R(");
    pickle.push(b'X');
    pickle.extend(1u32.to_le_bytes());
    pickle.push(b'w');
    pickle.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    pickle.push(b'X');
    pickle.extend(7u32.to_le_bytes());
    pickle.extend(b"storage");
    pickle.extend(b"tRu.");
    write_pt_with_pickle(&path, &pickle);
    guarded(pickle.len(), || {
        let err = Checkpoint::open(&path).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("m.pt"), "{err}");
    })
    .unwrap();
}
