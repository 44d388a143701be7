//! Checkpoint formats load to identical tensors; a written soup loads back bit-identically; bad
//! checkpoints give one-line errors naming the file and the tensor.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use soup_core::{ModelStore, ParamLayout, TensorSpec};
use soup_models::arch::clip::ClipClassifier;
use soup_models::checkpoint::{write_model_dir, write_safetensors};
use soup_models::testkit::fixtures::{
    bits, random_zoo, tiny_clip_config, write_hf_clip_dir, ScratchDir,
};
use soup_models::{Architecture, Checkpoint, FileStore};

fn tiny() -> (ClipClassifier, Vec<Tensor>) {
    let arch = ClipClassifier::new(tiny_clip_config(3, 4)).unwrap();
    let params = random_zoo(&arch, 1, 7).unwrap().remove(0);
    (arch, params)
}

#[test]
fn hf_directory_sharded_and_soup_files_load_identical_tensors() {
    let dir = ScratchDir::new("formats");
    let (arch, params) = tiny();

    // Hugging Face CLIPModel directory: architecture from config.json, text tower skipped.
    let hf = dir.path().join("hf");
    write_hf_clip_dir(&hf, &arch, &params).unwrap();
    let ckpt = Checkpoint::open(&hf).unwrap();
    let found = ckpt.architecture().unwrap();
    assert_eq!(found.config(), arch.config());
    assert_eq!(
        bits(&ckpt.load_params(found.as_ref(), &Device::Cpu).unwrap()),
        bits(&params)
    );

    // Sharded: two files and an index; both shards are read.
    let sharded = dir.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::copy(hf.join("config.json"), sharded.join("config.json")).unwrap();
    let half = arch.layout().len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (k, range) in [(1, 0..half), (2, half..arch.layout().len())] {
        let file = format!("model-0000{k}-of-00002.safetensors");
        let specs = arch.layout().tensors[range.clone()].to_vec();
        for s in &specs {
            weight_map.insert(s.name.clone(), file.clone().into());
        }
        write_safetensors(
            &sharded.join(&file),
            &ParamLayout::new(specs),
            &params[range],
            &BTreeMap::new(),
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let ckpt = Checkpoint::open(&sharded).unwrap();
    let found = ckpt.architecture().unwrap();
    assert_eq!(
        bits(&ckpt.load_params(found.as_ref(), &Device::Cpu).unwrap()),
        bits(&params)
    );

    // soup's own directory (metadata names the architecture) and a bare file.
    let ours = dir.path().join("ours");
    let meta = BTreeMap::from([("soup.method".to_string(), "mehl+".to_string())]);
    write_model_dir(&ours, &arch, &params, &meta, "").unwrap();
    for path in [ours.clone(), ours.join("model.safetensors")] {
        let ckpt = Checkpoint::open(&path).unwrap();
        assert_eq!(ckpt.metadata().unwrap()["soup.method"], "mehl+");
        assert_eq!(ckpt.metadata().unwrap()["format"], "pt");
        let found = ckpt.architecture().unwrap();
        assert_eq!(found.family(), "clip-vit");
        assert_eq!(
            bits(&ckpt.load_params(found.as_ref(), &Device::Cpu).unwrap()),
            bits(&params)
        );
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ours.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "clip_vision_model");
    assert_eq!(config["hidden_size"], 16);
}

#[test]
fn half_precision_checkpoints_are_computed_in_f32() {
    let dir = ScratchDir::new("f16");
    let (arch, params) = tiny();
    let half: Vec<Tensor> = params
        .iter()
        .map(|t| t.to_dtype(DType::F16).unwrap())
        .collect();
    let path = dir.path().join("half.safetensors");
    let mut meta = soup_models::checkpoint::arch_metadata(&arch);
    meta.insert("note".into(), "f16".into());
    write_safetensors(&path, arch.layout(), &half, &meta).unwrap();
    let loaded = Checkpoint::open(&path)
        .unwrap()
        .load_params(&arch, &Device::Cpu)
        .unwrap();
    for (l, h) in loaded.iter().zip(&half) {
        assert_eq!(l.dtype(), DType::F32);
        assert_eq!(
            bits(std::slice::from_ref(l)),
            bits(&[h.to_dtype(DType::F32).unwrap()])
        );
    }
}

fn error_of(path: &Path) -> String {
    let arch = ClipClassifier::new(tiny_clip_config(3, 4)).unwrap();
    match Checkpoint::open(path).and_then(|c| c.load_params(&arch, &Device::Cpu)) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_checkpoints_give_one_line_errors_naming_file_and_tensor() {
    let dir = ScratchDir::new("bad");
    let (arch, params) = tiny();
    let good = dir.path().join("good.safetensors");
    write_safetensors(
        &good,
        arch.layout(),
        &params,
        &soup_models::checkpoint::arch_metadata(&arch),
    )
    .unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    let missing_file = dir.path().join("absent.safetensors");
    let unknown_format = dir.path().join("weights.npz");
    std::fs::write(&unknown_format, b"PK").unwrap();
    for (path, what) in [
        (&truncated, "not a valid safetensors file"),
        (&garbage, "not a valid safetensors file"),
        (&missing_file, "No such file"),
        (&unknown_format, "unknown checkpoint format"),
    ] {
        let msg = error_of(path);
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(what),
            "{msg}"
        );
        assert_eq!(msg.lines().count(), 1, "{msg}");
    }

    // A missing tensor, and a tensor of the wrong shape.
    let mut specs = arch.layout().tensors.clone();
    let mut tensors = params.clone();
    specs.remove(3);
    tensors.remove(3);
    let missing = dir.path().join("missing.safetensors");
    write_safetensors(
        &missing,
        &ParamLayout::new(specs),
        &tensors,
        &BTreeMap::new(),
    )
    .unwrap();
    let msg = error_of(&missing);
    assert!(
        msg.contains("missing.safetensors")
            && msg.contains(&arch.layout().tensors[3].name)
            && msg.contains("missing"),
        "{msg}"
    );

    let mut tensors = params.clone();
    let mut specs = arch.layout().tensors.clone();
    tensors[0] = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
    specs[0].shape = vec![5];
    let shaped = dir.path().join("shape.safetensors");
    write_safetensors(
        &shaped,
        &ParamLayout::new(specs),
        &tensors,
        &BTreeMap::new(),
    )
    .unwrap();
    let msg = error_of(&shaped);
    assert!(
        msg.contains("shape.safetensors") && msg.contains("class_embedding") && msg.contains("[5]"),
        "{msg}"
    );

    // An unknown architecture in the metadata.
    let unknown = dir.path().join("unknown.safetensors");
    let meta = BTreeMap::from([("soup.arch".to_string(), "resnet-50".to_string())]);
    write_safetensors(&unknown, arch.layout(), &params, &meta).unwrap();
    let msg = Checkpoint::open(&unknown)
        .unwrap()
        .architecture()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("unknown architecture \"resnet-50\"") && msg.contains("clip-vit"),
        "{msg}"
    );
}

#[test]
fn zoo_members_that_do_not_match_are_named() {
    let dir = ScratchDir::new("zoo");
    let (arch, _) = tiny();
    let other = ClipClassifier::new(tiny_clip_config(3, 5)).unwrap();
    let mut paths = Vec::new();
    for (i, params) in random_zoo(&arch, 2, 1).unwrap().into_iter().enumerate() {
        let p = dir.path().join(format!("m{i}"));
        write_model_dir(&p, &arch, &params, &BTreeMap::new(), "").unwrap();
        paths.push(p);
    }
    let odd = dir.path().join("odd");
    write_model_dir(
        &odd,
        &other,
        &random_zoo(&other, 1, 2).unwrap()[0],
        &BTreeMap::new(),
        "",
    )
    .unwrap();
    paths.push(odd);
    let store = FileStore::open(paths, Device::Cpu).unwrap();
    assert_eq!(store.len(), 3);
    let msg = soup_core::uniform_soup(&store, soup_core::RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("odd") && msg.contains("classification_head.weight"),
        "{msg}"
    );
}

#[test]
fn writing_is_atomic() {
    let dir = ScratchDir::new("atomic");
    let (arch, params) = tiny();
    let path = dir.path().join("soup.safetensors");
    write_safetensors(&path, arch.layout(), &params, &BTreeMap::new()).unwrap();
    let before = std::fs::read(&path).unwrap();
    // A failing write (a tensor count that does not match the layout is caught; a directory in the
    // way of the temporary file makes the write itself fail) leaves the old file and no debris.
    let blocker = dir
        .path()
        .join(format!(".soup.safetensors.tmp.{}", std::process::id()));
    std::fs::create_dir_all(blocker.join("x")).unwrap();
    assert!(write_safetensors(&path, arch.layout(), &params, &BTreeMap::new()).is_err());
    std::fs::remove_dir_all(&blocker).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("soup.safetensors")]);
}

#[test]
fn openai_pt_twin_loads_to_the_same_tensors_as_the_hf_directory() {
    let dir = ScratchDir::new("pt");
    // Width 64 so that OpenAI's rule (heads = width / 64) gives the fixture's one head.
    let config = soup_models::arch::clip::ClipVitConfig {
        hidden_size: 64,
        num_attention_heads: 1,
        ..tiny_clip_config(3, 4)
    };
    let arch = ClipClassifier::new(config).unwrap();
    let params = random_zoo(&arch, 1, 3).unwrap().remove(0);
    let pt = dir.path().join("model_0.pt");
    soup_models::testkit::fixtures::write_openai_pt(&pt, &arch, &params).unwrap();
    let hf = dir.path().join("hf");
    write_hf_clip_dir(&hf, &arch, &params).unwrap();

    let from_pt = Checkpoint::open(&pt).unwrap();
    let found = from_pt.architecture().unwrap();
    assert_eq!(
        found.config(),
        arch.config(),
        "architecture read off the .pt shapes"
    );
    let a = from_pt.load_params(found.as_ref(), &Device::Cpu).unwrap();
    let hf_ckpt = Checkpoint::open(&hf).unwrap();
    let b = hf_ckpt
        .load_params(hf_ckpt.architecture().unwrap().as_ref(), &Device::Cpu)
        .unwrap();
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(bits(&a), bits(&params));

    // A corrupt .pt names the file.
    let bad = dir.path().join("bad.pt");
    std::fs::write(&bad, b"PK\x03\x04 not really a zip").unwrap();
    let msg = Checkpoint::open(&bad).unwrap_err().to_string();
    assert!(
        msg.contains("bad.pt") && msg.contains("not a readable PyTorch checkpoint"),
        "{msg}"
    );
}

/// soup's safetensors writer against the real library's output (`tests/golden/`, made once by
/// safetensors 0.8.0 from Python with `make_safetensors.py`): the same tensors and metadata give
/// the same length, the same header as JSON (the library orders metadata by a hash map, soup
/// sorts it) and the same padding and data bytes; and soup reads the library's file back.
#[test]
fn the_writer_matches_the_safetensors_library_and_reads_its_files() {
    let golden = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/safetensors-0.8.safetensors"
    ))
    .unwrap();
    let dev = Device::Cpu;
    let a: Vec<f32> = (0..6).map(|v| v as f32 / 7.0).collect();
    let tensors = vec![
        Tensor::new(&[[0i64, 1, 2]], &dev).unwrap(),
        Tensor::from_vec(a, (2, 3), &dev).unwrap(),
        Tensor::new(&[1.5f32, -2.25, 3e-8, 1e30], &dev).unwrap(),
        Tensor::new(&[0.5f32, -1.0, 2.0], &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap(),
    ];
    let layout = ParamLayout::new(
        ["position_ids", "a.weight", "b.bias", "c.half"]
            .iter()
            .zip(&tensors)
            .map(|(n, t)| TensorSpec {
                name: n.to_string(),
                shape: t.dims().to_vec(),
            })
            .collect(),
    );
    let meta = BTreeMap::from([
        ("soup.method".to_string(), "uniform".to_string()),
        ("soup.recipe".to_string(), r#"{"lr":0.01}"#.to_string()),
    ]);
    let dir = ScratchDir::new("golden-st");
    let path = dir.path().join("ours.safetensors");
    write_safetensors(&path, &layout, &tensors, &meta).unwrap();
    let ours = std::fs::read(&path).unwrap();
    assert_eq!(ours.len(), golden.len());
    let header_len = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let n = header_len(&golden);
    assert_eq!(header_len(&ours), n, "header length and padding");
    let json = |b: &[u8]| -> serde_json::Value { serde_json::from_slice(&b[8..8 + n]).unwrap() };
    assert_eq!(json(&ours), json(&golden));
    assert_eq!(&ours[8 + n..], &golden[8 + n..], "data bytes");
    // The padding is spaces, as the library writes it.
    let padding = |b: &[u8]| b[8..8 + n].iter().rev().take_while(|&&c| c == b' ').count();
    assert_eq!(padding(&ours), padding(&golden));
    // soup reads the library's file: values, dtypes, metadata.
    let golden_path = dir.path().join("golden.safetensors");
    std::fs::write(&golden_path, &golden).unwrap();
    let ckpt = Checkpoint::open(&golden_path).unwrap();
    assert_eq!(ckpt.metadata().unwrap()["soup.recipe"], r#"{"lr":0.01}"#);
    assert_eq!(ckpt.dtype("c.half").unwrap(), "F16");
    let b = ckpt.load("b.bias", &dev).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(b, vec![1.5, -2.25, 3e-8, 1e30]);
}
