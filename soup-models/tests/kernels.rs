//! The fused CPU kernels against the composed reference ops: values and gradients (f64, random
//! shapes and values), f32 agreement, and non-contiguous inputs. The whole-model finite-difference
//! checks of `gradients.rs` run through the kernels as well.

use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use soup_core::rng::SplitMix64;
use soup_models::ops::cpu as kernels;
use soup_models::{ops, ops::reference};

fn random(rng: &mut SplitMix64, shape: &[usize], dtype: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rng.normals(n), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// max |t_j| in f64.
fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// Runs `f` (fused) and `g` (reference) on the same variables; compares the outputs and the
/// gradients of ⟨output, R⟩ for a random R, to `tol` relative to the largest magnitude.
fn check(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Tensor,
    g: impl Fn(&[Tensor]) -> Tensor,
    seed: u64,
    tol: f64,
) -> Result<(), TestCaseError> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (yf, yg) = (f(&ts), g(&ts));
    prop_assert_eq!(yf.dims(), yg.dims());
    let scale = |t: &Tensor| max_abs(t).max(1.0);
    let err = max_abs_diff(&yf, &yg) / scale(&yg);
    prop_assert!(err <= tol, "output differs by {err:e}");
    let r = random(&mut SplitMix64::new(seed), yg.dims(), yg.dtype());
    let gf = (&yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gg = (&yg * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (k, t) in ts.iter().enumerate() {
        let a = gf.get(t).expect("fused op gives a gradient");
        let b = gg.get(t).expect("reference gives a gradient");
        let err = max_abs_diff(a, b) / scale(b);
        prop_assert!(err <= tol, "gradient of input {k} differs by {err:e}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn linear_matches_reference(rows in 1usize..7, inp in 1usize..9, out in 1usize..6, bias: bool, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let x = random(&mut rng, &[2, rows, inp], DType::F64);
        let w = random(&mut rng, &[out, inp], DType::F64);
        let b = random(&mut rng, &[out], DType::F64);
        let inputs = if bias { vec![x, w, b] } else { vec![x, w] };
        check(
            &inputs,
            |t| ops::linear(&t[0], &t[1], t.get(2)).unwrap(),
            |t| reference::linear(&t[0], &t[1], t.get(2)).unwrap(),
            seed,
            1e-12,
        )?;
    }

    #[test]
    fn layer_norm_matches_reference(rows in 1usize..6, d in 1usize..40, shift in -50.0f64..50.0, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        // A large common offset tests the two-pass variance.
        let x = (random(&mut rng, &[2, rows, d], DType::F64) + shift).unwrap();
        let w = random(&mut rng, &[d], DType::F64);
        let b = random(&mut rng, &[d], DType::F64);
        check(
            &[x, w, b],
            |t| kernels::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            |t| reference::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            seed,
            1e-10,
        )?;
    }

    #[test]
    fn quick_gelu_matches_reference(n in 1usize..200, spread in 0.1f64..20.0, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let x = (random(&mut rng, &[n], DType::F64) * spread).unwrap();
        check(
            &[x],
            |t| kernels::quick_gelu(&t[0]).unwrap(),
            |t| reference::quick_gelu(&t[0]).unwrap(),
            seed,
            1e-12,
        )?;
    }

    #[test]
    fn gelu_matches_reference(n in 1usize..200, spread in 0.1f64..20.0, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let x = (random(&mut rng, &[n], DType::F64) * spread).unwrap();
        check(
            &[x],
            |t| kernels::gelu(&t[0]).unwrap(),
            |t| reference::gelu(&t[0]).unwrap(),
            seed,
            1e-12,
        )?;
    }

    #[test]
    fn attention_matches_reference(n in 1usize..4, t in 1usize..8, heads in 1usize..4, hd in 1usize..6, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let e = heads * hd;
        let qkv = (random(&mut rng, &[n, t, 3 * e], DType::F64) * 2.0).unwrap();
        let scale = (hd as f64).powf(-0.5);
        check(
            &[qkv],
            |x| kernels::attention(&x[0], heads, scale).unwrap(),
            |x| reference::attention(&x[0], heads, scale).unwrap(),
            seed,
            1e-12,
        )?;
    }
}

#[test]
fn f32_kernels_agree_with_the_reference() {
    let mut rng = SplitMix64::new(4);
    let x = random(&mut rng, &[3, 17, 48], DType::F32);
    let w = random(&mut rng, &[40, 48], DType::F32);
    let b = random(&mut rng, &[40], DType::F32);
    let g = random(&mut rng, &[48], DType::F32);
    let pairs = [
        (
            ops::linear(&x, &w, Some(&b)).unwrap(),
            reference::linear(&x, &w, Some(&b)).unwrap(),
        ),
        (
            kernels::layer_norm(&x, &g, &g, 1e-5).unwrap(),
            reference::layer_norm(&x, &g, &g, 1e-5).unwrap(),
        ),
        (
            kernels::quick_gelu(&x).unwrap(),
            reference::quick_gelu(&x).unwrap(),
        ),
        (
            kernels::attention(&x, 4, 0.25).unwrap(),
            reference::attention(&x, 4, 0.25).unwrap(),
        ),
        (kernels::gelu(&x).unwrap(), reference::gelu(&x).unwrap()),
    ];
    for (i, (a, b)) in pairs.iter().enumerate() {
        let err = max_abs_diff(a, b);
        assert!(err < 1e-4, "op {i}: f32 kernel differs by {err:e}");
    }
}

/// The exact GELU against values of x·Φ(x) computed independently (Φ(1) = 0.841344746068543,
/// Φ(−0.5) = 0.308537538725987, Φ(3) = 0.998650101968370) and its derivative against central
/// differences of those: candle's `gelu_erf` is the reference of the kernel, so this checks both
/// against something neither wrote.
#[test]
fn gelu_is_x_times_the_normal_cdf() {
    let xs = [1.0f64, -0.5, 3.0, 0.0];
    let want = [
        0.841_344_746_068_543,
        -0.154_268_769_362_993_5,
        2.995_950_305_905_11,
        0.0,
    ];
    let x = Tensor::new(&xs[..], &Device::Cpu).unwrap();
    let y: Vec<f64> = kernels::gelu(&x).unwrap().to_vec1().unwrap();
    for ((x, y), w) in xs.iter().zip(&y).zip(want) {
        assert!((y - w).abs() < 1e-14, "gelu({x}) = {y}, expected {w}");
    }
    let v = Var::from_tensor(&x).unwrap();
    let grads = kernels::gelu(v.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dy: Vec<f64> = grads.get(v.as_tensor()).unwrap().to_vec1().unwrap();
    let h = 1e-6;
    for (i, &x0) in xs.iter().enumerate() {
        let at = |x: f64| -> f64 {
            kernels::gelu(&Tensor::new(&[x], &Device::Cpu).unwrap())
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0]
        };
        let fd = (at(x0 + h) - at(x0 - h)) / (2.0 * h);
        assert!(
            (dy[i] - fd).abs() < 1e-8,
            "gelu'({x0}) = {}, differences give {fd}",
            dy[i]
        );
    }
}

#[test]
fn kernels_take_non_contiguous_inputs() {
    let mut rng = SplitMix64::new(5);
    let xt = random(&mut rng, &[6, 5], DType::F64).t().unwrap();
    assert!(!xt.is_contiguous());
    let w = random(&mut rng, &[3, 6], DType::F64);
    let g = random(&mut rng, &[6], DType::F64);
    let diffs = [
        max_abs_diff(
            &kernels::linear(&xt, &w, None).unwrap(),
            &reference::linear(&xt, &w, None).unwrap(),
        ),
        max_abs_diff(
            &kernels::layer_norm(&xt, &g, &g, 1e-5).unwrap(),
            &reference::layer_norm(&xt, &g, &g, 1e-5).unwrap(),
        ),
    ];
    assert!(diffs.iter().all(|&d| d < 1e-12), "{diffs:?}");
}

#[test]
fn unsupported_inputs_fail_with_a_message() {
    let x = Tensor::zeros((2, 3, 7), DType::F64, &Device::Cpu).unwrap();
    let err = kernels::attention(&x, 2, 1.0).unwrap_err().to_string();
    assert!(err.contains("heads"), "{err}");
    let x = Tensor::zeros((2, 4), DType::BF16, &Device::Cpu).unwrap();
    assert!(!kernels::supported(&x));
    let err = kernels::quick_gelu(&x).unwrap_err().to_string();
    assert!(err.contains("f32 and f64"), "{err}");
}

#[test]
fn exp_f32_is_accurate_over_the_whole_range() {
    let mut worst = 0.0f64;
    let mut x = -87.0f32;
    while x <= 88.0 {
        let want = (x as f64).exp();
        let got = kernels::exp_f32(x) as f64;
        worst = worst.max((got - want).abs() / want);
        x += 0.000_37;
    }
    assert!(worst < 3e-7, "relative error {worst:e}");
    assert!(kernels::exp_f32(-1e4) >= 0.0 && kernels::exp_f32(-1e4) < 1e-37);
    assert!(kernels::exp_f32(1e4).is_finite());
    assert!(kernels::exp_f32(f32::NAN).is_nan());
    assert_eq!(kernels::exp_f32(0.0), 1.0);
}

/// Φ in f32 (the exact GELU's f32 kernels) against erf in f64: relative error over a fine grid
/// of [−10, 10] (Φ(−10) ≈ 7.6e−24: the lower tail keeps its relative accuracy), and the f32
/// GELU and its derivative against the f64 kernel on the same grid, to an absolute error scaled
/// by max(1, |x|).
#[test]
fn normal_cdf_f32_is_accurate() {
    // Φ(x) = ½ erfc(−x/√2): no cancellation in the lower tail.
    let phi = |x: f64| 0.5 * candle_core::cpu::erf::erfc_f64(-x / std::f64::consts::SQRT_2);
    let (mut worst_cdf, mut worst_gelu, mut worst_derivative) = (0.0f64, 0.0f64, 0.0f64);
    let xs: Vec<f32> = (0..=200_000).map(|i| -10.0 + i as f32 * 1e-4).collect();
    for &x in &xs {
        let want = phi(x as f64);
        let got = kernels::normal_cdf_f32(x) as f64;
        worst_cdf = worst_cdf.max((got - want).abs() / want);
    }
    let x32 = Tensor::new(&xs[..], &Device::Cpu).unwrap();
    let x64 = x32.to_dtype(DType::F64).unwrap();
    let (v32, v64) = (
        Var::from_tensor(&x32).unwrap(),
        Var::from_tensor(&x64).unwrap(),
    );
    let run = |v: &Var| {
        let y = kernels::gelu(v.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let dy = g.get(v.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
        (
            y.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
            dy.to_vec1::<f64>().unwrap(),
        )
    };
    let ((y32, d32), (y64, d64)) = (run(&v32), run(&v64));
    for (i, &x) in xs.iter().enumerate() {
        let scale = (x.abs() as f64).max(1.0);
        worst_gelu = worst_gelu.max((y32[i] - y64[i]).abs() / scale);
        worst_derivative = worst_derivative.max((d32[i] - d64[i]).abs() / scale);
    }
    eprintln!("Φ {worst_cdf:e}, gelu {worst_gelu:e}, gelu' {worst_derivative:e}");
    assert!(worst_cdf < 1e-5, "Φ: relative error {worst_cdf:e}");
    assert!(worst_gelu < 3e-7, "gelu: error {worst_gelu:e}");
    assert!(worst_derivative < 3e-7, "gelu': error {worst_derivative:e}");
    assert!(kernels::normal_cdf_f32(f32::NAN).is_nan());
    assert_eq!(kernels::normal_cdf_f32(f32::INFINITY), 1.0);
    assert_eq!(kernels::normal_cdf_f32(f32::NEG_INFINITY), 0.0);
}
