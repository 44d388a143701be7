//! Data set readers on files written by the tests, the held-out split, and preprocessing.

use std::io::Write;

use candle_core::Device;
use soup_models::arch::ImageSpec;
use soup_models::data::{prepare, DataSpec, Heldout, Split};
use soup_models::testkit::fixtures::ScratchDir;

fn idx_images(n: usize, h: usize, w: usize) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 3];
    for d in [n, h, w] {
        b.extend((d as u32).to_be_bytes());
    }
    b.extend((0..n * h * w).map(|i| (i % 251) as u8));
    b
}

fn idx_labels(n: usize) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 1];
    b.extend((n as u32).to_be_bytes());
    b.extend((0..n).map(|i| (i % 10) as u8));
    b
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn write_idx(dir: &std::path::Path, train: usize, test: usize, zipped: bool) {
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let files = [
            (format!("{prefix}-images-idx3-ubyte"), idx_images(n, 28, 28)),
            (format!("{prefix}-labels-idx1-ubyte"), idx_labels(n)),
        ];
        for (name, bytes) in files {
            if zipped {
                std::fs::write(dir.join(format!("{name}.gz")), gz(&bytes)).unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }
}

#[test]
fn idx_files_and_the_heldout_split() {
    for zipped in [true, false] {
        let dir = ScratchDir::new("idx");
        write_idx(dir.path(), 200, 50, zipped);
        let spec = DataSpec::new(dir.path().to_str().unwrap());
        let train = spec.load(Split::Train).unwrap();
        let heldout = spec.load(Split::Heldout).unwrap();
        let test = spec.load(Split::Test).unwrap();
        assert_eq!((train.len(), heldout.len(), test.len()), (180, 20, 50));
        assert_eq!(
            (train.channels, train.height, train.width, train.num_classes),
            (1, 28, 28, 10)
        );
        // Held-out and train are disjoint and cover the training file: compare the first pixel
        // of each image, which is (784·i) mod 251 for image i: distinct for i < 251.
        let first = |r: &soup_models::data::RawImages| -> Vec<u8> {
            r.pixels.chunks(784).map(|c| c[0]).collect()
        };
        let mut all: Vec<u8> = first(&train).into_iter().chain(first(&heldout)).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 200);
        // The split is fixed by its seed.
        assert_eq!(spec.load(Split::Heldout).unwrap(), heldout);
        let other = DataSpec {
            heldout: Heldout::Fraction {
                fraction: 0.1,
                seed: 9,
            },
            ..spec.clone()
        };
        assert_ne!(other.load(Split::Heldout).unwrap(), heldout);
    }
}

#[test]
fn heldout_index_file() {
    let dir = ScratchDir::new("index");
    write_idx(dir.path(), 30, 5, true);
    let index = dir.path().join("heldout.txt");
    std::fs::write(&index, "3\n7\n\n11\n").unwrap();
    let spec = DataSpec {
        heldout: Heldout::IndexFile(index.clone()),
        ..DataSpec::new(dir.path().to_str().unwrap())
    };
    let heldout = spec.load(Split::Heldout).unwrap();
    assert_eq!(heldout.labels, vec![3, 7, 1]);
    assert_eq!(spec.load(Split::Train).unwrap().len(), 27);
    std::fs::write(&index, "3\n30\n").unwrap();
    let msg = spec.load(Split::Heldout).unwrap_err().to_string();
    assert!(
        msg.contains("heldout.txt") && msg.contains("line 2") && msg.contains("30"),
        "{msg}"
    );
}

#[test]
fn bad_data_names_the_file() {
    let dir = ScratchDir::new("baddata");
    write_idx(dir.path(), 20, 5, false);
    let images = dir.path().join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&images).unwrap();
    std::fs::write(&images, &bytes[..bytes.len() - 10]).unwrap();
    let msg = DataSpec::new(dir.path().to_str().unwrap())
        .load(Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("train-images-idx3-ubyte") && msg.contains("header promises"),
        "{msg}"
    );
    std::fs::write(&images, b"\0\0\x08\x01rest").unwrap();
    let msg = DataSpec::new(dir.path().to_str().unwrap())
        .load(Split::Train)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("magic 0x803"), "{msg}");
    let msg = DataSpec::new("/nonexistent/data")
        .load(Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("/nonexistent/data") && msg.contains("no such data directory"),
        "{msg}"
    );
}

#[test]
fn cifar_binary_files() {
    for classes in [10usize, 100] {
        let dir = ScratchDir::new("cifar");
        let label_bytes = if classes == 10 { 1 } else { 2 };
        let record = |label: u8| -> Vec<u8> {
            let mut r = vec![label / 2; label_bytes];
            r[label_bytes - 1] = label;
            r.extend((0..3072).map(|i| (i / 1024) as u8 * 100 + label));
            r
        };
        let files: Vec<String> = if classes == 10 {
            (1..=5)
                .map(|i| format!("data_batch_{i}.bin"))
                .chain(["test_batch.bin".to_string()])
                .collect()
        } else {
            vec!["train.bin".into(), "test.bin".into()]
        };
        for (k, f) in files.iter().enumerate() {
            let bytes: Vec<u8> = (0..4u8).flat_map(|i| record(i + k as u8)).collect();
            std::fs::write(dir.path().join(f), bytes).unwrap();
        }
        let spec = DataSpec::new(dir.path().to_str().unwrap());
        let test = spec.load(Split::Test).unwrap();
        assert_eq!(
            (test.len(), test.channels, test.height, test.num_classes),
            (4, 3, 32, classes)
        );
        let k = files.len() as u8 - 1;
        assert_eq!(
            test.labels,
            vec![k as u32, k as u32 + 1, k as u32 + 2, k as u32 + 3]
        );
        // Planes R, G, B: the first pixel of each plane.
        assert_eq!(
            (test.pixels[0], test.pixels[1024], test.pixels[2048]),
            (k, 100 + k, 200 + k)
        );
        let train_n =
            spec.load(Split::Train).unwrap().len() + spec.load(Split::Heldout).unwrap().len();
        assert_eq!(train_n, 4 * (files.len() - 1));
    }
}

#[test]
fn image_folder_is_decoded_resized_and_cropped() {
    let dir = ScratchDir::new("folder");
    for (split, count) in [("train", 3), ("val", 1)] {
        for (class, colour) in [("cat", [200u8, 10, 10]), ("dog", [10, 10, 200])] {
            let d = dir.path().join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..count {
                let img = image::RgbImage::from_pixel(40 + 10 * i, 30, image::Rgb(colour));
                img.save(d.join(format!("{i}.png"))).unwrap();
            }
        }
    }
    let spec = DataSpec::new(dir.path().to_str().unwrap());
    let val = spec.load(Split::Test).unwrap();
    assert_eq!(
        (
            val.len(),
            val.channels,
            val.height,
            val.width,
            val.num_classes
        ),
        (2, 3, 224, 224, 2)
    );
    assert_eq!(val.labels, vec![0, 1]);
    let side = 224 * 224;
    assert_eq!(
        (val.pixels[0], val.pixels[side], val.pixels[2 * side]),
        (200, 10, 10)
    );
    assert_eq!(
        spec.load(Split::Train).unwrap().len() + spec.load(Split::Heldout).unwrap().len(),
        6
    );
}

#[test]
fn preparation_matches_channels_size_and_normalisation() {
    let dir = ScratchDir::new("prep");
    write_idx(dir.path(), 10, 4, true);
    let raw = DataSpec::new(dir.path().to_str().unwrap())
        .load(Split::Test)
        .unwrap();
    // Same size, grey → RGB with per-channel statistics.
    let spec = ImageSpec {
        channels: 3,
        height: 28,
        width: 28,
        mean: vec![0.5, 0.0, 0.25],
        std: vec![0.5, 1.0, 2.0],
    };
    let data = prepare(&raw, &spec, &Device::Cpu).unwrap();
    assert_eq!(data.all().unwrap().dims(), &[4, 3, 28, 28]);
    let v = data
        .all()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let p = raw.pixels[5] as f32 / 255.0;
    let plane = 28 * 28;
    assert!((v[5] - (p - 0.5) / 0.5).abs() < 1e-6);
    assert!((v[plane + 5] - p).abs() < 1e-6);
    assert!((v[2 * plane + 5] - (p - 0.25) / 2.0).abs() < 1e-6);
    // Resized to 14: a constant image stays constant.
    let mut flat = raw.clone();
    flat.pixels.iter_mut().for_each(|p| *p = 51);
    let spec = ImageSpec {
        channels: 1,
        height: 14,
        width: 14,
        mean: vec![0.0],
        std: vec![1.0],
    };
    let data = prepare(&flat, &spec, &Device::Cpu).unwrap();
    assert_eq!(data.all().unwrap().dims(), &[4, 1, 14, 14]);
    for v in data
        .all()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
    {
        assert!((v - 0.2).abs() < 1e-6, "{v}");
    }
}

#[test]
fn shifts_corrupt_as_documented() {
    use soup_models::data::{shifted, RawImages, Shift};
    // One 5 × 5 grey image: a bright centre pixel on a mid-grey field.
    let mut pixels = vec![100u8; 25];
    pixels[12] = 250;
    let raw = RawImages {
        channels: 1,
        height: 5,
        width: 5,
        pixels,
        labels: vec![7],
        num_classes: 10,
    };
    let out = shifted(&raw, &Shift::ALL, 1);
    assert_eq!(out.len(), 4);
    assert_eq!(out.labels, vec![7; 4]);
    let img = |k: usize| &out.pixels[k * 25..(k + 1) * 25];
    // Noise changes pixels; blur spreads the bright pixel (centre: (8·100 + 250)/9 = 117).
    assert!(img(0).iter().zip(&raw.pixels).any(|(a, b)| a != b));
    assert_eq!(img(1)[12], 117);
    assert_eq!(img(1)[0], 100);
    // Rotation about the centre keeps the centre pixel, fills a corner with black.
    assert_eq!(img(2)[12], 250);
    assert_eq!(img(2)[0], 0);
    // Contrast pulls pixels towards the mean (106): 250 → 164, 100 → 104.
    assert_eq!((img(3)[12], img(3)[0]), (164, 104));
    assert_eq!(Shift::parse_list("all").unwrap(), Shift::ALL.to_vec());
    assert_eq!(
        Shift::parse_list("blur,noise").unwrap(),
        vec![Shift::Blur, Shift::Noise]
    );
    assert!(Shift::parse_list("fog").unwrap_err().contains("fog"));
}

/// An ImageFolder of `per_class` noisy images of odd sizes per class, PNG and JPEG.
fn noisy_folder(root: &std::path::Path, per_class: u32) {
    let mut seed = 1u32;
    let mut next = move || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 24) as u8
    };
    for split in ["train", "val"] {
        for class in ["a", "b", "c"] {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..per_class {
                let (w, h) = (230 + 13 * i, 224 + 7 * (i % 3));
                let img = image::RgbImage::from_fn(w, h, |x, y| {
                    image::Rgb([(x * 3) as u8, (y * 5) as u8, next()])
                });
                let ext = if i % 2 == 0 { "png" } else { "jpg" };
                img.save(d.join(format!("{i}.{ext}"))).unwrap();
            }
        }
    }
}

/// Streamed ImageFolder data are the in-memory data, bit for bit, batch by batch, prefetched or
/// not, with one thread or several.
#[test]
fn a_streamed_image_folder_equals_the_decoded_one() {
    let dir = ScratchDir::new("stream");
    noisy_folder(dir.path(), 5);
    let spec = DataSpec::new(dir.path().to_str().unwrap());
    // The in-memory path decodes to 224 px squares: at a 224 px model both paths resize once.
    let input = ImageSpec {
        channels: 3,
        height: 224,
        width: 224,
        mean: vec![0.4, 0.5, 0.6],
        std: vec![0.2, 0.25, 0.3],
    };
    for split in [Split::Train, Split::Heldout, Split::Test] {
        let memory = prepare(&spec.load(split).unwrap(), &input, &Device::Cpu).unwrap();
        let stream = spec
            .stream(split, &input, None, &Default::default())
            .unwrap();
        assert!(matches!(stream.images, soup_models::Images::Stream(_)));
        assert_eq!(stream.labels, memory.labels, "{split:?}");
        let bits = |t: candle_core::Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(
            bits(stream.all().unwrap()),
            bits(memory.all().unwrap()),
            "{split:?}"
        );
        let rows: Vec<u32> = (0..stream.len() as u32).rev().step_by(2).collect();
        let expected = bits(memory.select(&rows).unwrap().0);
        // Prefetched, prefetched other rows, and on one thread: the same batch.
        stream.prefetch(rows.clone());
        assert_eq!(bits(stream.select(&rows).unwrap().0), expected);
        stream.prefetch(vec![0]);
        assert_eq!(bits(stream.select(&rows).unwrap().0), expected);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        assert_eq!(
            one.install(|| bits(stream.select(&rows).unwrap().0)),
            expected
        );
        assert_eq!(stream.resident_bytes(2), (2 * 2 * 3 * 224 * 224 * 4) as u64);
    }
    // A cap takes the first examples of the split.
    let capped = spec
        .stream(Split::Test, &input, Some(4), &Default::default())
        .unwrap();
    assert_eq!(capped.len(), 4);
    // A file that does not decode is named when its batch is asked for.
    let bad = dir.path().join("val/a/0.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let stream = spec
        .stream(Split::Test, &input, None, &Default::default())
        .unwrap();
    let err = stream.select(&[0]).unwrap_err().to_string();
    assert!(err.contains("0.png"), "{err}");
}

/// Fine-tuning on a streamed image folder (batches prefetched) gives the model that fine-tuning
/// on the same images in memory gives, bit for bit.
#[test]
fn fine_tuning_on_streamed_images_equals_fine_tuning_in_memory() {
    use soup_models::arch::clip::ClipClassifier;
    use soup_models::train::finetune::{finetune, Augment, FinetuneConfig};
    use soup_models::Architecture;
    let dir = ScratchDir::new("stream-train");
    noisy_folder(dir.path(), 4);
    let spec = DataSpec::new(dir.path().to_str().unwrap());
    let arch = ClipClassifier::new(soup_models::arch::clip::ClipVitConfig {
        image_size: 224,
        patch_size: 56,
        ..soup_models::testkit::fixtures::tiny_clip_config(3, 3)
    })
    .unwrap();
    let input = arch.image_input().unwrap();
    let memory = prepare(&spec.load(Split::Train).unwrap(), &input, &Device::Cpu).unwrap();
    let stream = spec
        .stream(Split::Train, &input, None, &Default::default())
        .unwrap();
    let config = FinetuneConfig {
        epochs: 2,
        batch_size: 3,
        lr: 1e-3,
        weight_decay: 0.01,
        warmup_fraction: 0.1,
        label_smoothing: 0.0,
        augment: Augment {
            crop_padding: 2,
            horizontal_flip: true,
            noise_std: 0.0,
        },
        clip_grad_norm: Some(1.0),
        seed: 3,
    };
    let init = arch.init(1, &Device::Cpu).unwrap();
    let train = |data| {
        finetune(&arch, &init, data, &config, &mut |_| {})
            .unwrap()
            .0
    };
    let bits = soup_models::testkit::fixtures::bits;
    assert_eq!(bits(&train(&stream)), bits(&train(&memory)));
}
