//! The matrix products of a training step, on their exact shapes, through the `gemm` crate (what
//! soup's fused linear kernel and candle call) and through the `cblas_sgemm` of BLAS libraries
//! found at run time (used by `cargo xtask bench --only gemm`).
//!
//! `gemm_bench [--reps 5] [--lm] [--lib NAME=PATH]...` prints one JSON line per model, batch, product
//! and implementation with every repetition's seconds, the median and GFLOP/s. The products of
//! one linear layer with R rows (batch × tokens), I inputs and O outputs, row-major as soup
//! stores them (W is O × I):
//! - `forward`: Y = X Wᵀ (R × O, inner I);
//! - `grad_input`: dX = dY W (R × I, inner O);
//! - `grad_weight`: dW = dYᵀ X (O × I, inner R).
//!
//! With `--lm`, the layers of SmolLM2-135M (`llama`) at 4 × 256 tokens instead, and its
//! vocabulary head on one chunk of the fused loss (256 rows).
//!
//! Every implementation computes the same products of the same operands with the machine's
//! threads (`gemm`: rayon; BLAS: its own threads, `OPENBLAS_NUM_THREADS`/`BLIS_NUM_THREADS` as
//! the caller sets them); one result of each is checked against the `gemm` crate's.

use std::ffi::{c_int, c_void, CString};
use std::time::Instant;

use gemm::Parallelism;
use soup_models::ops::cpu::{sgemm, GemmKernels};

#[path = "common/bench_alloc.rs"]
mod bench_alloc;

/// The linear layers of one transformer block: (name, inputs, outputs).
fn layers(hidden: usize, mlp: usize) -> [(&'static str, usize, usize); 4] {
    [
        ("qkv", hidden, 3 * hidden),
        ("out_proj", hidden, hidden),
        ("fc1", hidden, mlp),
        ("fc2", mlp, hidden),
    ]
}

/// (model, tokens per image, hidden size, MLP size).
const MODELS: &[(&str, usize, usize, usize)] = &[
    ("clip-vit-b32", 50, 768, 3072),
    ("dinov2-vit-s14 (224 px)", 257, 384, 1536),
];
const BATCHES: &[usize] = &[8, 32];

/// SmolLM2-135M's linear layers (name, inputs, outputs, rows): 4 × 256 tokens, and the head on
/// one chunk of `ops::cpu::vocab`.
const LM_LAYERS: &[(&str, usize, usize, usize)] = &[
    ("q_proj", 576, 576, 1024),
    ("k_proj", 576, 192, 1024),
    ("qkv", 576, 960, 1024),
    ("gate_proj", 576, 1536, 1024),
    ("gate_up", 576, 3072, 1024),
    ("down_proj", 1536, 576, 1024),
    ("lm_head", 576, 49152, 256),
];

/// `cblas_sgemm` (row-major: Order 101; NoTrans 111, Trans 112).
type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);
const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// `cblas_sgemm` of the shared library at `path`, loaded for the life of the process.
fn load_sgemm(path: &str) -> Result<Sgemm, String> {
    let c_path = CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: dlopen with a valid C string; the handle is never closed, so the symbol stays valid.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(format!("{path}: cannot be loaded"));
    }
    // SAFETY: dlsym on a live handle with a valid C string.
    let symbol: *mut c_void = unsafe { libc::dlsym(handle, c"cblas_sgemm".as_ptr()) };
    if symbol.is_null() {
        return Err(format!("{path}: has no cblas_sgemm"));
    }
    // SAFETY: the CBLAS standard gives cblas_sgemm exactly this C signature.
    Ok(unsafe { std::mem::transmute::<*mut c_void, Sgemm>(symbol) })
}

/// Who computes a product.
#[derive(Clone, Copy)]
enum Impl {
    /// `gemm::gemm`, the crate's own choice of kernels.
    Crate,
    /// soup's `ops::cpu::sgemm` with one kernel set.
    Soup(GemmKernels),
    /// A BLAS library's `cblas_sgemm`.
    Blas(Sgemm),
}

/// One product C (m × n) = op(A) op(B) with row-major operands: `a_t`/`b_t` say whether A is
/// stored k × m / B n × k (read transposed).
struct Product {
    m: usize,
    n: usize,
    k: usize,
    a_t: bool,
    b_t: bool,
}

/// The product through soup's `ops::cpu::sgemm` with one kernel set (what the fused kernels run).
fn run_soup(kernels: GemmKernels, p: &Product, a: &[f32], b: &[f32], c: &mut [f32]) {
    let (a_rs, a_cs) = if p.a_t { (1, p.m) } else { (p.k, 1) };
    let (b_rs, b_cs) = if p.b_t { (1, p.k) } else { (p.n, 1) };
    // SAFETY: as in `run_gemm`; `kernels` is a set this CPU runs (the caller filters them).
    unsafe {
        sgemm(
            kernels,
            (p.m, p.n, p.k),
            (c.as_mut_ptr(), 1, p.n as isize),
            false,
            (a.as_ptr(), a_cs as isize, a_rs as isize),
            (b.as_ptr(), b_cs as isize, b_rs as isize),
            (0.0, 1.0),
            match candle_core::utils::get_num_threads() {
                0 | 1 => Parallelism::None,
                n => Parallelism::Rayon(n),
            },
        )
    }
}

fn run_gemm(p: &Product, a: &[f32], b: &[f32], c: &mut [f32]) {
    // Row-major strides (row, column) of op(A) (m × k) and op(B) (k × n).
    let (a_rs, a_cs) = if p.a_t { (1, p.m) } else { (p.k, 1) };
    let (b_rs, b_cs) = if p.b_t { (1, p.k) } else { (p.n, 1) };
    // SAFETY: a, b, c hold m·k, k·n and m·n elements laid out with these strides (allocated by
    // the caller for this product), and c does not alias a or b.
    unsafe {
        gemm::gemm(
            p.m,
            p.n,
            p.k,
            c.as_mut_ptr(),
            1,
            p.n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            // As soup's kernels: candle's thread count.
            match candle_core::utils::get_num_threads() {
                0 | 1 => Parallelism::None,
                n => Parallelism::Rayon(n),
            },
        )
    }
}

fn run_blas(sgemm: Sgemm, p: &Product, a: &[f32], b: &[f32], c: &mut [f32]) {
    let (ta, lda) = if p.a_t { (TRANS, p.m) } else { (NO_TRANS, p.k) };
    let (tb, ldb) = if p.b_t { (TRANS, p.k) } else { (NO_TRANS, p.n) };
    // SAFETY: as in `run_gemm`; the leading dimensions are the stored row lengths.
    unsafe {
        sgemm(
            ROW_MAJOR,
            ta,
            tb,
            p.m as c_int,
            p.n as c_int,
            p.k as c_int,
            1.0,
            a.as_ptr(),
            lda as c_int,
            b.as_ptr(),
            ldb as c_int,
            0.0,
            c.as_mut_ptr(),
            p.n as c_int,
        )
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench_alloc::init();
    let mut reps = 5usize;
    let mut libs: Vec<(String, Sgemm)> = Vec::new();
    let mut lm = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--reps" => reps = value()?.parse()?,
            "--lm" => lm = true,
            "--lib" => {
                let v = value()?;
                let (name, path) = v.split_once('=').ok_or("--lib NAME=PATH")?;
                libs.push((name.to_string(), load_sgemm(path)?));
            }
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let mut rng = soup_core::rng::SplitMix64::new(3);
    let mut shapes = Vec::new();
    for &(model, tokens, hidden, mlp) in MODELS.iter().filter(|_| !lm) {
        for &batch in BATCHES {
            for (layer, i, o) in layers(hidden, mlp) {
                shapes.push((model, batch, layer, i, o, batch * tokens));
            }
        }
    }
    if lm {
        for &(layer, i, o, r) in LM_LAYERS {
            shapes.push(("smollm2-135m", 4, layer, i, o, r));
        }
    }
    {
        {
            for (model, batch, layer, i, o, r) in shapes {
                let products = [
                    (
                        "forward",
                        Product {
                            m: r,
                            n: o,
                            k: i,
                            a_t: false,
                            b_t: true,
                        },
                    ),
                    (
                        // The forward with W stored transposed (I × O), as soup's linear
                        // forward computes it.
                        "forward_wt",
                        Product {
                            m: r,
                            n: o,
                            k: i,
                            a_t: false,
                            b_t: false,
                        },
                    ),
                    (
                        "grad_input",
                        Product {
                            m: r,
                            n: i,
                            k: o,
                            a_t: false,
                            b_t: false,
                        },
                    ),
                    (
                        "grad_weight",
                        Product {
                            m: o,
                            n: i,
                            k: r,
                            a_t: true,
                            b_t: false,
                        },
                    ),
                ];
                for (what, p) in &products {
                    let a: Vec<f32> = rng.normals(p.m * p.k).iter().map(|&v| v as f32).collect();
                    let b: Vec<f32> = rng.normals(p.k * p.n).iter().map(|&v| v as f32).collect();
                    let mut reference = vec![0.0f32; p.m * p.n];
                    run_gemm(p, &a, &b, &mut reference);
                    let mut impls: Vec<(String, Impl)> = vec![("gemm".into(), Impl::Crate)];
                    impls.extend(
                        [GemmKernels::Avx512, GemmKernels::Avx2]
                            .into_iter()
                            .filter(|k| k.runs_here())
                            .map(|k| (format!("soup-{}", k.name()), Impl::Soup(k))),
                    );
                    impls.extend(libs.iter().map(|(n, f)| (n.clone(), Impl::Blas(*f))));
                    for (name, lib) in impls {
                        let mut c = vec![0.0f32; p.m * p.n];
                        let call = |c: &mut [f32]| match lib {
                            Impl::Crate => run_gemm(p, &a, &b, c),
                            Impl::Soup(k) => run_soup(k, p, &a, &b, c),
                            Impl::Blas(f) => run_blas(f, p, &a, &b, c),
                        };
                        call(&mut c); // warm-up, and the check
                        let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        let err = c
                            .iter()
                            .zip(&reference)
                            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
                        if err > 1e-4 * scale.max(1.0) {
                            return Err(
                                format!("{name} {model} {layer} {what}: off by {err}").into()
                            );
                        }
                        let mut secs: Vec<f64> = (0..reps)
                            .map(|_| {
                                let t = Instant::now();
                                call(&mut c);
                                t.elapsed().as_secs_f64()
                            })
                            .collect();
                        let s: Vec<String> = secs.iter().map(|v| format!("{v:.5}")).collect();
                        let med = median(&mut secs);
                        let gflops = 2.0 * (p.m * p.n * p.k) as f64 / med / 1e9;
                        println!(
                            "{{\"bench\":\"gemm\",\"model\":\"{model}\",\"batch\":{batch},\"layer\":\"{layer}\",\"product\":\"{what}\",\"m\":{},\"n\":{},\"k\":{},\"impl\":\"{name}\",\"seconds\":[{}],\"median_s\":{med:.5},\"gflops\":{gflops:.1}}}",
                            p.m, p.n, p.k, s.join(",")
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
