//! Preprocessing: images resized and cropped as the model's family does it, normalised into
//! model inputs.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::RawImages;
use crate::arch::ImageSpec;
use crate::error::{ModelError, Result};
use crate::train::objective::Dataset;

/// How an image is brought to the model's square input: CLIP's preprocessing, which resizes the
/// shorter side to the model's size with Pillow's bicubic filter ([`resize::resize_plane`], bit
/// for bit) and the longer side to `int(side × long / short)`, then crops the centre. The two
/// variants differ only in where an odd margin puts the crop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preprocess {
    /// OpenAI's `preprocess` (torchvision `Resize` + `CenterCrop` on PIL images), as model-soups
    /// and open_clip prepare images: crop offset `round(margin / 2)`, halves to even.
    #[default]
    Clip,
    /// transformers' `CLIPImageProcessorPil`: crop offset `margin / 2` rounded down.
    HfClip,
}

impl Preprocess {
    pub const NAMES: &'static [&'static str] = &["clip", "hf-clip"];

    /// The offset of a centred crop of `side` out of `len` pixels.
    fn crop_offset(self, len: usize, side: usize) -> usize {
        let margin = len - side;
        match self {
            // Python's round(margin / 2.0): an odd margin's half rounds to the even neighbour.
            Preprocess::Clip if margin % 2 == 1 && (margin / 2) % 2 == 1 => margin / 2 + 1,
            Preprocess::Clip | Preprocess::HfClip => margin / 2,
        }
    }
}

impl std::str::FromStr for Preprocess {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "clip" => Ok(Preprocess::Clip),
            "hf-clip" => Ok(Preprocess::HfClip),
            other => Err(format!("unknown preprocessing {other:?} (clip, hf-clip)")),
        }
    }
}

/// `planes` (`channels` planes of `h` × `w` u8 pixels) resized on the shorter side to `side`
/// and centre-cropped to `side` × `side` as `preprocess` does, planar.
pub fn resize_crop_planes(
    planes: &[u8],
    channels: usize,
    w: usize,
    h: usize,
    side: usize,
    preprocess: Preprocess,
) -> Vec<u8> {
    let (nw, nh) = if w <= h {
        (side, side * h / w)
    } else {
        (side * w / h, side)
    };
    // Python computes int(side * long / short) in floating point; for the sizes images have
    // (below 2^26 pixels a side) that equals the integer quotient.
    let (left, top) = (
        preprocess.crop_offset(nw, side),
        preprocess.crop_offset(nh, side),
    );
    let mut out = Vec::with_capacity(channels * side * side);
    for plane in planes.chunks(w * h).take(channels) {
        let resized = super::resize::resize_plane(plane, w, h, nw, nh);
        for row in resized.chunks(nw).skip(top).take(side) {
            out.extend_from_slice(&row[left..left + side]);
        }
    }
    out
}

/// An RGB image as planes, resized and cropped to `side` × `side` ([`resize_crop_planes`]).
pub fn square_rgb(img: &image::RgbImage, side: usize, preprocess: Preprocess) -> Vec<u8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut planes = vec![0u8; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            planes[c * w * h + i] = p[c];
        }
    }
    resize_crop_planes(&planes, 3, w, h, side, preprocess)
}

/// Model inputs from stored images: channels matched (grey replicated to RGB, RGB averaged to
/// grey), resized (shorter side, bicubic) and centre-cropped to the model's size, scaled to
/// [0, 1] and normalised with the model's per-channel mean and standard deviation.
pub fn prepare(raw: &RawImages, spec: &ImageSpec, device: &Device) -> Result<Dataset> {
    check_input(spec, raw.channels)?;
    let (c, side) = (spec.channels, spec.height);
    let len = raw.channels * raw.height * raw.width;
    let mut images = vec![0f32; raw.len() * c * side * side];
    images
        .par_chunks_mut(c * side * side)
        .zip(raw.pixels.par_chunks(len))
        .for_each(|(out, img)| prepare_one(img, raw.channels, raw.height, raw.width, spec, out));
    Ok(Dataset::in_memory(
        Tensor::from_vec(images, (raw.len(), c, side, side), device)?,
        raw.labels.clone(),
    ))
}

/// Refuses model inputs [`prepare_one`] cannot make.
pub(crate) fn check_input(spec: &ImageSpec, channels: usize) -> Result<()> {
    if spec.height != spec.width {
        return Err(ModelError::config(
            "data",
            "only square model inputs are supported",
        ));
    }
    if channels != 1 && channels != 3 {
        return Err(ModelError::config(
            "data",
            "images must have 1 or 3 channels",
        ));
    }
    Ok(())
}

/// One stored image (`channels` planes of `h` × `w` u8) as the model's input, into `out`: channels matched
/// (grey replicated, RGB averaged to grey), resized to the model's side when it is not, scaled to
/// [0, 1] and normalised.
pub(crate) fn prepare_one(
    img: &[u8],
    channels: usize,
    h: usize,
    w: usize,
    spec: &ImageSpec,
    out: &mut [f32],
) {
    let (c, side) = (spec.channels, spec.height);
    let plane = side * side;
    let planes = resize_planes(img, channels, h, w, side);
    for (ch, out) in out.chunks_mut(plane).take(c).enumerate() {
        let (m, s) = (spec.mean[ch], spec.std[ch]);
        match (channels, c) {
            (1, _) => {
                for (o, v) in out.iter_mut().zip(&planes[..plane]) {
                    *o = (v / 255.0 - m) / s;
                }
            }
            (3, 1) => {
                for (p, o) in out.iter_mut().enumerate() {
                    let v = (planes[p] + planes[plane + p] + planes[2 * plane + p]) / 3.0;
                    *o = (v / 255.0 - m) / s;
                }
            }
            _ => {
                for (o, v) in out.iter_mut().zip(&planes[ch * plane..(ch + 1) * plane]) {
                    *o = (v / 255.0 - m) / s;
                }
            }
        }
    }
}

/// One image's planes as f32 in 0..255, resized to `side` × `side` (identity when it already is).
pub(crate) fn resize_planes(
    img: &[u8],
    channels: usize,
    h: usize,
    w: usize,
    side: usize,
) -> Vec<f32> {
    if h == side && w == side {
        return img.iter().map(|&v| v as f32).collect();
    }
    resize_crop_planes(img, channels, w, h, side, Preprocess::Clip)
        .into_iter()
        .map(f32::from)
        .collect()
}
