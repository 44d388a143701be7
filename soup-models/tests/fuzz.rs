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
use soup_models::checkpoint::write_safetensors;
use soup_models::data::{DataSpec, Split};
use soup_models::fixtures::{random_zoo, tiny_clip_config, write_hf_clip_dir, ScratchDir};
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
        largest <= justified(len),
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
        soup_models::fixtures::write_openai_pt(&pt, &arch, &params).unwrap();

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
            let _ = soup_models::data::prepare(&raw, &arch.input(), &Device::Cpu);
        }
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
        for prefix in ["train", "t10k"] {
            std::fs::write(
                dir.path().join(format!("{prefix}-images-idx3-ubyte")),
                &images,
            )
            .unwrap();
            std::fs::write(
                dir.path().join(format!("{prefix}-labels-idx1-ubyte")),
                &labels,
            )
            .unwrap();
        }
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
        for prefix in ["train", "t10k"] {
            std::fs::write(
                dir.path().join(format!("{prefix}-images-idx3-ubyte.gz")),
                &images,
            )
            .unwrap();
            std::fs::write(
                dir.path().join(format!("{prefix}-labels-idx1-ubyte.gz")),
                &labels,
            )
            .unwrap();
        }
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
        guarded(png.len() + jpeg.len(), || exercise_data(dir.path()))
    });
}

/// The fixtures themselves load: the mutations start from valid files.
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
    for prefix in ["train", "t10k"] {
        std::fs::write(
            dir.path().join(format!("{prefix}-images-idx3-ubyte")),
            &f.idx_images,
        )
        .unwrap();
        std::fs::write(
            dir.path().join(format!("{prefix}-labels-idx1-ubyte")),
            &f.idx_labels,
        )
        .unwrap();
    }
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
