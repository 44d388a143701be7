//! Synthetic distribution shifts of an image split (noise, blur, contrast, …), seeded.

use soup_core::rng::SplitMix64;

use super::RawImages;

/// A distribution shift applied to stored images: the stand-in for model-soups' shifted test sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shift {
    /// Gaussian pixel noise, standard deviation 0.2 of the pixel range.
    Noise,
    /// A 3 × 3 box blur.
    Blur,
    /// A 20° rotation about the centre (nearest neighbour, black fill).
    Rotate,
    /// Contrast reduced to 40 % around each image's mean.
    Contrast,
}

impl Shift {
    pub const ALL: [Shift; 4] = [Shift::Noise, Shift::Blur, Shift::Rotate, Shift::Contrast];

    /// `noise`, `blur`, `rotate`, `contrast`, or `all`.
    pub fn parse_list(s: &str) -> std::result::Result<Vec<Shift>, String> {
        s.split(',')
            .map(|name| match name.trim() {
                "noise" => Ok(vec![Shift::Noise]),
                "blur" => Ok(vec![Shift::Blur]),
                "rotate" => Ok(vec![Shift::Rotate]),
                "contrast" => Ok(vec![Shift::Contrast]),
                "all" => Ok(Shift::ALL.to_vec()),
                other => Err(format!(
                    "unknown shift {other:?} (noise, blur, rotate, contrast, all)"
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(|v| v.concat())
    }

    fn apply(self, img: &mut [u8], channels: usize, h: usize, w: usize, rng: &mut SplitMix64) {
        let plane = h * w;
        match self {
            Shift::Noise => {
                for (v, e) in img.iter_mut().zip(rng.normals(channels * plane)) {
                    *v = (*v as f64 + 0.2 * 255.0 * e).round().clamp(0.0, 255.0) as u8;
                }
            }
            Shift::Blur => {
                for ch in img.chunks_mut(plane) {
                    let src = ch.to_vec();
                    for y in 0..h {
                        for x in 0..w {
                            let (mut sum, mut count) = (0u32, 0u32);
                            for yy in y.saturating_sub(1)..(y + 2).min(h) {
                                for xx in x.saturating_sub(1)..(x + 2).min(w) {
                                    sum += src[yy * w + xx] as u32;
                                    count += 1;
                                }
                            }
                            ch[y * w + x] = ((sum + count / 2) / count) as u8;
                        }
                    }
                }
            }
            Shift::Rotate => {
                let (sin, cos) = 20f64.to_radians().sin_cos();
                let (cy, cx) = ((h as f64 - 1.0) / 2.0, (w as f64 - 1.0) / 2.0);
                for ch in img.chunks_mut(plane) {
                    let src = ch.to_vec();
                    for y in 0..h {
                        for x in 0..w {
                            let (dy, dx) = (y as f64 - cy, x as f64 - cx);
                            let sy = (cos * dy - sin * dx + cy).round();
                            let sx = (sin * dy + cos * dx + cx).round();
                            let inside = sy >= 0.0 && sx >= 0.0 && sy < h as f64 && sx < w as f64;
                            ch[y * w + x] = if inside {
                                src[sy as usize * w + sx as usize]
                            } else {
                                0
                            };
                        }
                    }
                }
            }
            Shift::Contrast => {
                let mean = img.iter().map(|&v| v as f64).sum::<f64>() / img.len() as f64;
                for v in img.iter_mut() {
                    *v = (mean + 0.4 * (*v as f64 - mean)).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
}

/// The images under each shift in turn: `shifts.len()` copies of `raw`, labels repeated; the
/// noise is drawn from `seed`.
pub fn shifted(raw: &RawImages, shifts: &[Shift], seed: u64) -> RawImages {
    let mut rng = SplitMix64::new(seed);
    let len = raw.image_len();
    let mut out = RawImages {
        pixels: Vec::with_capacity(raw.pixels.len() * shifts.len()),
        labels: Vec::with_capacity(raw.labels.len() * shifts.len()),
        ..raw.clone()
    };
    for &s in shifts {
        for (img, &label) in raw.pixels.chunks(len).zip(&raw.labels) {
            let mut img = img.to_vec();
            s.apply(&mut img, raw.channels, raw.height, raw.width, &mut rng);
            out.pixels.extend(img);
            out.labels.push(label);
        }
    }
    out
}
