//! Pillow's bicubic resampling (`Image.resize(size, Image.BICUBIC)` on 8-bit images,
//! libImaging/Resample.c), bit for bit: the same kernel (a = −0.5) stretched by the scale when
//! reducing (antialiasing), the same support bounds and their rounding, coefficients normalised
//! then rounded to 22-bit fixed point, a horizontal pass over the rows the vertical pass needs,
//! rounded and clipped to u8, then the vertical pass. CLIP's preprocessing (OpenAI's
//! `preprocess`, open_clip, transformers' `CLIPImageProcessorPil`) resizes with it; the golden
//! images of `tests/golden/ecosystem/` prove the equality.

/// Fixed-point fraction bits of the coefficients (Pillow's `PRECISION_BITS`, 32 − 8 − 2).
const PRECISION_BITS: u32 = 22;

/// Pillow's bicubic kernel, its expression order kept (floating point is not associative).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output position: the first input index, and the fixed-point weights of the inputs
/// from there on (Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) casts truncate toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|&w| {
                    let w = if ww != 0.0 { w / ww } else { w };
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    if w < 0.0 {
                        (-0.5 + scaled) as i32
                    } else {
                        (0.5 + scaled) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// A weighted sum in fixed point, rounded and clipped to u8 (Pillow's `clip8`).
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `plane` (`h` rows of `w` u8 pixels) resized to `new_h` × `new_w` as Pillow's BICUBIC does.
/// An unchanged dimension is not resampled (Pillow skips that pass).
pub fn resize_plane(plane: &[u8], w: usize, h: usize, new_w: usize, new_h: usize) -> Vec<u8> {
    assert_eq!(plane.len(), w * h, "plane is h × w pixels");
    assert!(new_w > 0 && new_h > 0, "a resized image has pixels");
    let round = 1i32 << (PRECISION_BITS - 1);
    let vertical = coefficients(h, new_h);
    // Rows the vertical pass reads: the horizontal pass computes only those.
    let first = vertical[0].0;
    let last = vertical
        .last()
        .map_or(h, |(ymin, k)| ymin + k.len())
        .max(first);
    let (rows, row_w, offset) = if new_w != w {
        let horizontal = coefficients(w, new_w);
        let mut out = vec![0u8; (last - first) * new_w];
        for (y, row) in out.chunks_mut(new_w).enumerate() {
            let src = &plane[(y + first) * w..(y + first + 1) * w];
            for (o, (xmin, k)) in row.iter_mut().zip(&horizontal) {
                let mut sum = round;
                for (x, &kx) in k.iter().enumerate() {
                    sum += i32::from(src[xmin + x]) * kx;
                }
                *o = clip8(sum);
            }
        }
        (out, new_w, first)
    } else {
        (plane.to_vec(), w, 0)
    };
    if new_h == h {
        return rows;
    }
    let mut out = vec![0u8; new_h * row_w];
    for (row, (ymin, k)) in out.chunks_mut(row_w).zip(&vertical) {
        let ymin = ymin - offset;
        for (x, o) in row.iter_mut().enumerate() {
            let mut sum = round;
            for (y, &ky) in k.iter().enumerate() {
                sum += i32::from(rows[(ymin + y) * row_w + x]) * ky;
            }
            *o = clip8(sum);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(53, 32), (20, 32), (419, 224), (7, 3)] {
            for (_, k) in coefficients(i, o) {
                let sum: i32 = k.iter().sum();
                // Each weight rounds by at most 1/2 unit.
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i32,
                    "{sum}"
                );
            }
        }
    }

    #[test]
    fn a_constant_image_stays_constant() {
        let plane = vec![200u8; 37 * 53];
        for (nw, nh) in [(32, 45), (80, 100), (37, 20)] {
            assert!(resize_plane(&plane, 37, 53, nw, nh)
                .iter()
                .all(|&v| v == 200));
        }
    }

    #[test]
    fn the_same_size_is_the_identity() {
        let plane: Vec<u8> = (0..12u8 * 7).collect();
        assert_eq!(resize_plane(&plane, 12, 7, 12, 7), plane);
    }
}
