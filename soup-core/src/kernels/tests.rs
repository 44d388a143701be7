//! The kernels against candle ops and naive references, on every instruction set the CPU has.

#![allow(clippy::disallowed_methods)]

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use super::combine::*;
use super::direction::*;
use super::dots::*;
use super::lanes::*;
use super::widen::*;
use super::*;

fn random(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
    let n = shape.iter().product();
    let v = crate::rng::SplitMix64::new(seed).normals(n);
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The 32-lane sum of `dot` written out one element at a time: lane j mod 32 of the whole
/// lanes, the lanes added in f64 in order, then the rest.
fn lane_by_lane_dot(a: &[f32], b: &[f32]) -> f64 {
    let whole = a.len() - a.len() % DOT_LANES;
    let mut acc = [0.0f32; DOT_LANES];
    for j in 0..whole {
        acc[j % DOT_LANES] += a[j] * b[j];
    }
    let mut sum: f64 = acc.iter().map(|&v| f64::from(v)).sum();
    for j in whole..a.len() {
        sum += f64::from(a[j] * b[j]);
    }
    sum
}

/// Rows read side by side, in groups, give each row the bits it gets alone: the dot products
/// those of the lane-by-lane sum, θ those of adding the rows one after the other (rows with
/// x = 0 not added: a −0.0 of c stays −0.0, an infinite element adds no NaN).
#[test]
fn grouped_rows_give_each_rows_own_bits() {
    let v = |seed: u64, n: usize| -> Vec<f32> {
        crate::rng::SplitMix64::new(seed)
            .normals(n)
            .into_iter()
            .map(|a| a as f32)
            .collect()
    };
    for isa in Isa::available() {
        for rows in 1..=2 * MAX_GROUP + 1 {
            for len in [1usize, 31, 32, 33, 100, 2 * ROW_BLOCK + 37] {
                let mut d32 = v(rows as u64, rows * len);
                // Rows 0, 3, 6, … have x = 0 and an infinite first element: added, they
                // would make NaNs.
                for i in (0..rows).step_by(3) {
                    d32[i * len] = f32::INFINITY;
                }
                let dbf: Vec<bf16> = d32.iter().map(|&a| bf16::from_f32(a)).collect();
                let wide: Vec<f32> = dbf.iter().map(|&a| a.to_f32()).collect();
                let g = v(100 + len as u64, len);
                let mut c = v(200, len);
                c[0] = -0.0;
                let x: Vec<f32> = (0..rows)
                    .map(|i| if i % 3 == 0 { 0.0 } else { 0.5 + i as f32 })
                    .collect();
                for (d, reference) in [(&d32, &d32), (&wide, &wide)] {
                    let row = |i: usize| &d[i * len..(i + 1) * len];
                    let all: Vec<&[f32]> = (0..rows).map(row).collect();
                    let mut got = Vec::new();
                    dots_grouped_on(isa, &all, &g, &mut got);
                    let want: Vec<f64> = (0..rows)
                        .map(|i| lane_by_lane_dot(&reference[i * len..(i + 1) * len], &g))
                        .collect();
                    assert_eq!(
                        got.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                        "{isa:?}, {rows} rows of {len}"
                    );
                    let active: Vec<(f32, &[f32])> = (0..rows)
                        .filter(|&i| x[i] != 0.0)
                        .map(|i| (x[i], row(i)))
                        .collect();
                    let mut got = vec![f32::NAN; len];
                    axpys_grouped_on(isa, &mut got, &c, &active);
                    let want: Vec<f32> = (0..len)
                        .map(|j| {
                            let mut o = c[j];
                            for (xi, di) in &active {
                                o += xi * di[j];
                            }
                            o
                        })
                        .collect();
                    assert_eq!(
                        got.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                        "{isa:?}, {rows} rows of {len}"
                    );
                    // The whole kernel leaves out the rows with x = 0 itself.
                    let x64: Vec<f64> = x.iter().map(|&a| f64::from(a)).collect();
                    let mut got = vec![f32::NAN; len];
                    combine_into_slice_on(isa, &mut got, &c, d, &x64, 0..len);
                    assert_eq!(
                        got.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                        "{isa:?}, {rows} rows of {len}, combine"
                    );
                }
                // Half-precision rows widen to the f32 rows' results.
                let rows_bf: Vec<&[bf16]> =
                    (0..rows).map(|i| &dbf[i * len..(i + 1) * len]).collect();
                let mut got = Vec::new();
                dots_grouped_on(isa, &rows_bf, &g, &mut got);
                let want: Vec<f64> = (0..rows)
                    .map(|i| lane_by_lane_dot(&wide[i * len..(i + 1) * len], &g))
                    .collect();
                assert_eq!(got, want, "{isa:?}, bf16, {rows} rows of {len}");
            }
        }
    }
}

/// Every one of the 65,536 f16s widens to `half`'s f32, bit for bit (zeros, subnormals,
/// infinities and NaNs included).
#[test]
fn f16_widens_as_half_does() {
    for h in 0..=u16::MAX {
        let want = f16::from_bits(h).to_f32().to_bits();
        let got = f16_to_f32(h).to_bits();
        assert_eq!(
            got, want,
            "f16 bits {h:#06x}: {got:#010x}, half gives {want:#010x}"
        );
    }
}

/// The vectorised builds of the loops give the baseline's bits (the CPUs that run CI have
/// AVX2 or AVX-512; this test says which it compared).
#[test]
fn every_instruction_set_gives_the_same_bits() {
    let isas = Isa::available();
    eprintln!("instruction sets compared: {isas:?}");
    let v = |seed: u64, n: usize| crate::rng::SplitMix64::new(seed).normals(n);
    for len in [1usize, 7, 8, 9, 1000, CHUNK + 13] {
        let rows = 3;
        let (d64, g64, c64) = (v(1, rows * len), v(2, len), v(3, len));
        let x = [0.25, -1.5, 0.0];
        let d32: Vec<f32> = d64.iter().map(|&a| a as f32).collect();
        let (g32, c32): (Vec<f32>, Vec<f32>) = (
            g64.iter().map(|&a| a as f32).collect(),
            c64.iter().map(|&a| a as f32).collect(),
        );
        let dbf: Vec<bf16> = d32.iter().map(|&a| bf16::from_f32(a)).collect();
        let dh: Vec<f16> = d32.iter().map(|&a| f16::from_f32(a)).collect();
        let bits64 = |v: Vec<f64>| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
        let bits32 = |v: Vec<f32>| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
        let run = |isa: Isa| {
            let combine32 = |d: &dyn Fn(&mut [f32])| {
                let mut out = vec![0.0f32; len];
                d(&mut out);
                bits32(out)
            };
            (
                bits64(dots_slices_on(isa, &d64, &g64)),
                bits64(dots_slices_on(isa, &d32, &g32)),
                bits64(dots_slices_on(isa, &dbf, &g32)),
                bits64(dots_slices_on(isa, &dh, &g32)),
                combine32(&|o| combine_into_slice_on(isa, o, &c32, &d32, &x, 0..len)),
                combine32(&|o| combine_into_slice_on(isa, o, &c32, &dbf, &x, 0..len)),
                combine32(&|o| combine_into_slice_on(isa, o, &c32, &dh, &x, 0..len)),
                {
                    let mut out = vec![0.0f64; len];
                    combine_into_slice_on(isa, &mut out, &c64, &d64, &x, 0..len);
                    bits64(out)
                },
                dot_on(isa, &g32, &g32).to_bits(),
            )
        };
        let base = run(Isa::Baseline);
        for &isa in &isas[1..] {
            assert!(
                run(isa) == base,
                "{isa:?} differs from the baseline at length {len}"
            );
        }
    }
}

#[test]
fn dots_match_a_matrix_vector_product() {
    // Lengths around the chunk size and the eight lanes.
    for (len, rows) in [(1, 1), (7, 3), (CHUNK + 9, 5), (3 * CHUNK, 2)] {
        for dtype in [DType::F32, DType::F64] {
            let d = random(len as u64, &[rows, len], dtype);
            let g = random(1 + len as u64, &[len], dtype);
            let want: Vec<f64> = d
                .to_dtype(DType::F64)
                .unwrap()
                .matmul(&g.to_dtype(DType::F64).unwrap().unsqueeze(1).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = dots(&d, &g).unwrap();
            let tol = if dtype == DType::F32 { 1e-4 } else { 1e-10 };
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= tol * (len as f64).sqrt(), "{a} vs {b}");
            }
        }
    }
}

#[test]
fn dots_over_pieces_match_the_product_with_their_concatenation() {
    for lens in [
        vec![3],
        vec![1, 7, 2],
        vec![CHUNK + 9, 5, CHUNK - 1],
        vec![2 * CHUNK, CHUNK],
    ] {
        let len: usize = lens.iter().sum();
        for dtype in [DType::F32, DType::F64] {
            let d = random(len as u64, &[3, len], dtype);
            let pieces: Vec<Tensor> = lens
                .iter()
                .enumerate()
                .map(|(k, &n)| random(10 + k as u64, &[n], dtype))
                .collect();
            let g = Tensor::cat(&pieces, 0).unwrap();
            let want: Vec<f64> = d
                .to_dtype(DType::F64)
                .unwrap()
                .matmul(&g.to_dtype(DType::F64).unwrap().unsqueeze(1).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = dots_pieces(&d, &pieces).unwrap();
            let tol = if dtype == DType::F32 { 1e-4 } else { 1e-10 };
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= tol * (len as f64).sqrt(),
                    "{lens:?}: {a} vs {b}"
                );
            }
            // One piece is `dots`, bit for bit.
            assert_eq!(dots_pieces(&d, std::slice::from_ref(&g)), dots(&d, &g));
            // Each piece's Σ g² from the same pass: `sum_squares`'s bits, piece by piece.
            let (dots_too, squares) = dots_pieces_and_squares(&d, &pieces).unwrap();
            assert_eq!(dots_too, got);
            let want: Vec<u64> = pieces
                .iter()
                .map(|p| sum_squares(p).unwrap().to_bits())
                .collect();
            let squares: Vec<u64> = squares.iter().map(|v| v.to_bits()).collect();
            assert_eq!(squares, want, "{lens:?} {dtype:?}");
        }
    }
    // Pieces that do not add up to the directions' length, or of two dtypes.
    let d = random(1, &[2, 6], DType::F32);
    let a = random(2, &[4], DType::F32);
    assert!(dots_pieces(&d, std::slice::from_ref(&a)).is_none());
    let b = random(3, &[2], DType::F64);
    assert!(dots_pieces(&d, &[a.clone(), b]).is_none());
    assert!(dots_pieces(&d, &[a, random(4, &[2], DType::F32)]).is_some());
}

#[test]
fn combine_matches_candle_ops() {
    for (len, rows) in [(5, 1), (CHUNK + 3, 4)] {
        let c = random(3, &[len], DType::F64);
        let d = random(4, &[rows, len], DType::F64);
        let x: Vec<f64> = (0..rows).map(|i| i as f64 - 1.5).collect();
        let xs = Tensor::from_vec(x.clone(), (1, rows), &Device::Cpu).unwrap();
        let want = (xs.matmul(&d).unwrap().squeeze(0).unwrap() + &c).unwrap();
        let got = combine(&c, &d, &x, 0..len, &[len]).unwrap();
        let err: f64 = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(err < 1e-12, "{err}");
        // In place into an existing tensor: the same values.
        let dst = Tensor::zeros(len, DType::F64, &Device::Cpu).unwrap();
        combine_into(&dst, &c, &d, &x, 0..len).unwrap();
        let err: f64 = (&dst - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(err < 1e-12, "{err}");
        assert!(combine_into(&dst.to_dtype(DType::F32).unwrap(), &c, &d, &x, 0..len).is_none());
        // A sub-range is the same elements.
        let part = combine(&c, &d, &x, 2..len, &[len - 2]).unwrap();
        let tail = want.narrow(0, 2, len - 2).unwrap();
        let err: f64 = (part - tail)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(err < 1e-12, "{err}");
    }
}

#[test]
fn sum_squares_and_unsupported_inputs() {
    let t = random(9, &[3, CHUNK + 1], DType::F32);
    let want: f64 = t
        .to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let got = sum_squares(&t).unwrap();
    assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
    // Non-contiguous and other dtypes go back to candle's ops.
    assert!(sum_squares(&t.t().unwrap()).is_none());
    assert!(sum_squares(&t.to_dtype(DType::BF16).unwrap()).is_none());
    let g = random(1, &[4], DType::F32);
    assert!(dots(&random(2, &[2, 5], DType::F32), &g).is_none());
}

#[test]
fn half_directions_give_the_f32_kernels_results_on_the_widened_directions() {
    for dtype in [DType::BF16, DType::F16] {
        for (len, rows) in [(13, 2), (CHUNK + 5, 3)] {
            let c = random(5, &[len], DType::F32);
            let g = random(6, &[len], DType::F32);
            let d = random(7, &[rows, len], DType::F32).to_dtype(dtype).unwrap();
            let wide = d.to_dtype(DType::F32).unwrap();
            let x: Vec<f64> = (0..rows).map(|i| 0.25 - i as f64).collect();
            // Widening is exact, so the arithmetic is the same, bit for bit.
            assert_eq!(dots(&d, &g).unwrap(), dots(&wide, &g).unwrap());
            let half = combine(&c, &d, &x, 1..len, &[len - 1]).unwrap();
            let full = combine(&c, &wide, &x, 1..len, &[len - 1]).unwrap();
            let bits = |t: &Tensor| t.to_vec1::<f32>().unwrap();
            assert_eq!(bits(&half), bits(&full));
            let dst = Tensor::zeros(len - 1, DType::F32, &Device::Cpu).unwrap();
            combine_into(&dst, &c, &d, &x, 1..len).unwrap();
            assert_eq!(bits(&dst), bits(&full));
            // The result is in the center's dtype; f64 centers take f64 directions only.
            assert_eq!(half.dtype(), DType::F32);
            let c64 = c.to_dtype(DType::F64).unwrap();
            assert!(combine(&c64, &d, &x, 0..len, &[len]).is_none());
            assert!(dots(&d, &g.to_dtype(DType::F64).unwrap()).is_none());
        }
    }
}

/// A direction row written from a model's pieces is (m − c)·scale of the concatenation,
/// rounded to the directions' dtype, as candle's ops make it; the norm is ‖m − c‖ to f32
/// rounding; the other rows are untouched; a declined scale writes nothing.
#[test]
fn direction_rows_match_candle_ops() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for sizes in [vec![13usize], vec![CHUNK + 5, 7, 2 * CHUNK]] {
            let len: usize = sizes.iter().sum();
            let pieces: Vec<Tensor> = sizes
                .iter()
                .enumerate()
                .map(|(k, &n)| random(20 + k as u64, &[n], DType::F32))
                .collect();
            let c = random(9, &[len], DType::F32);
            let d = random(10, &[3, len], DType::F32).to_dtype(dtype).unwrap();
            let before = d.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            let m = Tensor::cat(&pieces, 0).unwrap();
            let diff = (&m - &c).unwrap();
            let want_norm = diff
                .to_dtype(DType::F64)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .sqrt();
            let mut seen = None;
            let norm = direction_row(&d, 1, &pieces, &c, |n| {
                seen = Some(n);
                Some(1.0 / n)
            })
            .unwrap();
            assert_eq!(seen, Some(norm));
            assert!(
                (norm - want_norm).abs() <= 1e-6 * want_norm,
                "{norm} {want_norm}"
            );
            let want = diff
                .affine(1.0 / norm, 0.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let after = d.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(after[1], want, "{dtype:?} {sizes:?}");
            assert_eq!((&after[0], &after[2]), (&before[0], &before[2]));
            // Declined: the row keeps its values.
            let norm2 = direction_row(&d, 0, &pieces, &c, |_| None).unwrap();
            assert_eq!(norm2, norm);
            assert_eq!(
                d.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()[0],
                before[0]
            );
        }
    }
    // Unsupported: f64 models, a row past the end, sizes that do not add up.
    let c = random(1, &[8], DType::F32);
    let d = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap();
    let p = [random(2, &[8], DType::F32)];
    let p64 = [p[0].to_dtype(DType::F64).unwrap()];
    assert!(direction_row(&d, 0, &p64, &c, |_| Some(1.0)).is_none());
    assert!(direction_row(&d, 2, &p, &c, |_| Some(1.0)).is_none());
    assert!(direction_row(&d, 0, &p[..0], &c, |_| Some(1.0)).is_none());
    assert_eq!(d.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
}

/// The squared distance of every instruction set gives the baseline's bits.
#[test]
fn squared_distances_agree_across_instruction_sets() {
    let v = |seed: u64, n: usize| -> Vec<f32> {
        crate::rng::SplitMix64::new(seed)
            .normals(n)
            .iter()
            .map(|&a| a as f32)
            .collect()
    };
    for len in [1usize, 31, 32, 33, 1000] {
        let (a, b) = (v(1, len), v(2, len));
        let naive: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from((x - y) * (x - y)))
            .sum();
        for isa in Isa::available() {
            let got = squared_distance_on(isa, &a, &b);
            assert_eq!(got.to_bits(), squared_distance(&a, &b).to_bits(), "{isa:?}");
            assert!((got - naive).abs() <= 1e-5 * naive, "{got} {naive}");
        }
    }
}
