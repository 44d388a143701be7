//! Which of the `gemm` crate's f32 micro-kernels the fused kernels' matrix products run, chosen
//! once per process from the CPU.
//!
//! The `gemm` crate (built with its `x86-v4` feature) picks its AVX-512 kernels whenever the CPU
//! has `avx512f`, and so does soup: they were at least as fast as the AVX2 kernels on every CPU
//! measured (BENCHMARKS.md, "The `gemm` crate's AVX-512 kernels"), once a large row-major lhs is
//! copied column-major first ([`transpose_lhs_first`]). soup calls the kernels itself, for that
//! copy and for the override:
//!
//! - AVX-512 kernels where the CPU has `avx512f`;
//! - the AVX2/FMA kernels on other x86-64 CPUs with `fma`;
//! - the `gemm` crate's own choice elsewhere (other architectures, f64).
//!
//! `SOUP_GEMM_KERNELS=avx512|avx2|auto` overrides the choice (for benchmarks and for CPUs the
//! rule misjudges); a set the CPU lacks is never run: the detected choice is used instead. The
//! kernels differ in the order of their sums only, so results differ by rounding; one machine
//! always makes the same choice, so reruns stay bit-identical.

use gemm::Parallelism;

/// The f32 kernel sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernels {
    /// The `gemm` crate's AVX-512 micro-kernels (64 × 6 register tile).
    Avx512,
    /// The `gemm` crate's AVX2/FMA micro-kernels (16 × 6 register tile).
    Avx2,
    /// Whatever `gemm::gemm` picks (not x86-64, or a CPU without FMA).
    Crate,
}

impl GemmKernels {
    /// The name `SOUP_GEMM_KERNELS` and the benchmarks use.
    pub fn name(self) -> &'static str {
        match self {
            GemmKernels::Avx512 => "avx512",
            GemmKernels::Avx2 => "avx2",
            GemmKernels::Crate => "gemm-crate",
        }
    }

    /// Whether this CPU can run the set.
    pub fn runs_here(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            GemmKernels::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            GemmKernels::Avx2 => {
                is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx2")
            }
            GemmKernels::Crate => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The rule of the module docs, without the environment: what this CPU gets by default.
    pub fn for_this_cpu() -> GemmKernels {
        if GemmKernels::Avx512.runs_here() {
            GemmKernels::Avx512
        } else if GemmKernels::Avx2.runs_here() {
            GemmKernels::Avx2
        } else {
            GemmKernels::Crate
        }
    }

    /// The choice for `SOUP_GEMM_KERNELS`'s value (`None`: unset): a named set this CPU runs, or
    /// else the CPU's default. An unknown name is an error.
    pub fn resolve(requested: Option<&str>) -> Result<GemmKernels, String> {
        let wanted = match requested.map(str::trim) {
            None | Some("") | Some("auto") => return Ok(GemmKernels::for_this_cpu()),
            Some("avx512") => GemmKernels::Avx512,
            Some("avx2") => GemmKernels::Avx2,
            Some(other) => {
                return Err(format!(
                    "SOUP_GEMM_KERNELS={other:?}: expected avx512, avx2 or auto"
                ))
            }
        };
        Ok(if wanted.runs_here() {
            wanted
        } else {
            GemmKernels::for_this_cpu()
        })
    }

    /// The set this process runs: read once from `SOUP_GEMM_KERNELS` and the CPU. An unknown
    /// value falls back to the CPU's default (the binaries check it first: [`Self::check_env`]).
    pub fn current() -> GemmKernels {
        static CHOICE: std::sync::OnceLock<GemmKernels> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| {
            let value = std::env::var("SOUP_GEMM_KERNELS").ok();
            GemmKernels::resolve(value.as_deref()).unwrap_or_else(|_| GemmKernels::for_this_cpu())
        })
    }

    /// `SOUP_GEMM_KERNELS`'s value checked: an error message for an unknown one.
    pub fn check_env() -> Result<(), String> {
        GemmKernels::resolve(std::env::var("SOUP_GEMM_KERNELS").ok().as_deref()).map(|_| ())
    }
}

/// Whether [`sgemm`] copies its lhs (m × k, after the transposition to a column-major dst) into
/// column-major order before the product: with the AVX-512 kernels, when the lhs is row-major
/// (`lhs_cs` = 1, as W in the linear forward Y = X Wᵀ) with rows at least
/// [`TRANSPOSE_MIN_ROW_STRIDE`] apart, and the product is large. Those kernels pack 64 such rows
/// per panel, and rows 8 KiB or more apart (a multiple of 4 KiB: the same L1 sets) evict one
/// another, which the copy (one pass over W) avoids. For short rows the copy costs more than it
/// saves, and the AVX2 kernels (16-row panels) do not suffer (BENCHMARKS.md, "Matrix products").
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn transpose_lhs_first(
    kernels: GemmKernels,
    (m, n, k): (usize, usize, usize),
    lhs_cs: isize,
    lhs_rs: isize,
) -> bool {
    kernels == GemmKernels::Avx512
        && lhs_cs == 1
        && lhs_rs.unsigned_abs() >= TRANSPOSE_MIN_ROW_STRIDE
        && m * k >= TRANSPOSE_MIN_ELEMENTS
        && n >= TRANSPOSE_MIN_N
}

/// The row stride (elements) from which a row-major lhs is copied first: 8 KiB of f32.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const TRANSPOSE_MIN_ROW_STRIDE: usize = 2048;
/// The smallest lhs copied: 2^18 elements (1 MiB).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const TRANSPOSE_MIN_ELEMENTS: usize = 1 << 18;
/// The narrowest product it is copied for: the copy costs m·k moves, the product m·n·k FMAs.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const TRANSPOSE_MIN_N: usize = 64;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The buffer [`lhs_column_major`] copies into, kept between products (no allocation and
    /// no zeroing in the step's loop).
    static LHS_COPY: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The m × k matrix at `lhs` (row-major, row stride `lhs_rs` ≥ k) copied into the first m·k
/// elements of `out` in column-major order (element (i, j) at i + j·m), in 32 × 32 tiles on
/// rayon's threads.
///
/// # Safety
/// `lhs + i·lhs_rs + j` must be a valid f32 for every i < m, j < k during the call.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
unsafe fn lhs_column_major(out: &mut Vec<f32>, m: usize, k: usize, lhs: *const f32, lhs_rs: isize) {
    use rayon::prelude::*;
    const TILE: usize = 32;
    if out.len() < m * k {
        out.resize(m * k, 0.0);
    }
    let src = super::SharedMut(lhs as *mut f32);
    // Each task writes TILE whole columns of the result from a TILE-wide stripe of lhs.
    out[..m * k]
        .par_chunks_mut(TILE * m)
        .enumerate()
        .for_each(|(stripe, cols)| {
            let j0 = stripe * TILE;
            let width = cols.len() / m;
            for i0 in (0..m).step_by(TILE) {
                let rows = TILE.min(m - i0);
                // SAFETY: i0 + t < m and j0 + width ≤ k: within the matrix the caller vouches
                // for; only read.
                let row = |t: usize| unsafe {
                    std::slice::from_raw_parts(
                        src.at(0).offset((i0 + t) as isize * lhs_rs).add(j0),
                        width,
                    )
                };
                let tile: [&[f32]; TILE] = std::array::from_fn(|t| row(t.min(rows - 1)));
                for (dj, col) in cols.chunks_exact_mut(m).enumerate() {
                    for (t, c) in col[i0..i0 + rows].iter_mut().enumerate() {
                        *c = tile[t][dj];
                    }
                }
            }
        });
}

/// dst (m × n) = alpha·dst + beta·lhs·rhs in f32 with `kernels`, the arguments as `gemm::gemm`
/// takes them (column stride before row stride).
///
/// # Safety
/// `gemm::gemm`'s contract: each pointer with its strides addresses valid elements of an m × n
/// (dst), m × k (lhs) and k × n (rhs) matrix for the whole call; dst overlaps neither operand and
/// no other thread touches dst meanwhile; no stride is negative. `kernels` must run on this CPU
/// ([`GemmKernels::runs_here`]; [`GemmKernels::current`] always does).
// SAFETY: an unsafe fn whose contract is the "# Safety" section above; it forwards the pointers
// to gemm's product, whose requirements are that same contract.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    kernels: GemmKernels,
    (m, n, k): (usize, usize, usize),
    (dst, dst_cs, dst_rs): (*mut f32, isize, isize),
    read_dst: bool,
    (lhs, lhs_cs, lhs_rs): (*const f32, isize, isize),
    (rhs, rhs_cs, rhs_rs): (*const f32, isize, isize),
    (alpha, beta): (f32, f32),
    parallelism: Parallelism,
) {
    #[cfg(target_arch = "x86_64")]
    if kernels != GemmKernels::Crate {
        use gemm_common::gemm::gemm_basic_generic;
        // As `gemm::gemm` does first: the micro-kernels want a column-major destination, so a
        // row-major product is computed as its transpose, dstᵀ = rhsᵀ·lhsᵀ (no data moves).
        let (m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs) =
            if dst_cs.abs() < dst_rs.abs() {
                (
                    n, m, dst_rs, dst_cs, rhs, rhs_rs, rhs_cs, lhs, lhs_rs, lhs_cs,
                )
            } else {
                (
                    m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs,
                )
            };
        // A row-major lhs is copied column-major first (`transpose_lhs_first`).
        let mut copy = Vec::new();
        let (lhs, lhs_cs, lhs_rs) = if transpose_lhs_first(kernels, (m, n, k), lhs_cs, lhs_rs) {
            copy = LHS_COPY.take();
            // SAFETY: the caller's contract: lhs with these strides addresses an m × k matrix.
            unsafe { lhs_column_major(&mut copy, m, k, lhs, lhs_rs) };
            (copy.as_ptr(), m as isize, 1)
        } else {
            (lhs, lhs_cs, lhs_rs)
        };
        use gemm_common::simd::MixedSimd;
        // The gemm crate's own instantiation for a kernel set (gemm-common's `__inject_mod`):
        // its SIMD type, its micro-kernel module and N, the f32 lanes of one register.
        macro_rules! product {
            ($simd:ty, $ukr:ident, $lanes:literal, $cpu:literal) => {{
                use gemm_f32::microkernel::$ukr::f32 as ukr;
                let simd = <$simd as MixedSimd<f32, f32, f32, f32>>::try_new()
                    .expect(concat!("the caller checked that the CPU has ", $cpu));
                // SAFETY: the caller's contract is gemm's; the kernels run on this CPU (checked
                // by `try_new` above); the constants are the crate's own for this set.
                unsafe {
                    gemm_basic_generic::<
                        _,
                        f32,
                        $lanes,
                        { ukr::MR_DIV_N * $lanes },
                        { ukr::NR },
                        { ukr::MR_DIV_N },
                        { ukr::H_M },
                        { ukr::H_N },
                    >(
                        simd,
                        m,
                        n,
                        k,
                        dst,
                        dst_cs,
                        dst_rs,
                        read_dst,
                        lhs,
                        lhs_cs,
                        lhs_rs,
                        rhs,
                        rhs_cs,
                        rhs_rs,
                        alpha,
                        beta,
                        false,
                        false,
                        false,
                        |a, b, c| a * b + c,
                        &ukr::UKR,
                        &ukr::H_UKR,
                        false,
                        parallelism,
                    )
                };
            }};
        }
        match kernels {
            GemmKernels::Avx512 => product!(gemm_common::simd::V4, avx512f, 16, "AVX-512"),
            GemmKernels::Avx2 => product!(gemm_common::simd::V3, fma, 8, "AVX2 and FMA"),
            GemmKernels::Crate => unreachable!("excluded above"),
        }
        if copy.capacity() > 0 {
            LHS_COPY.set(copy);
        }
        return;
    }
    let _ = kernels;
    // SAFETY: the caller's contract is gemm::gemm's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            read_dst,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            alpha,
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy of a row-major lhs puts element (i, j) at i + j·m, for sizes off the tiles and a
    /// row stride past the row length; a buffer longer than needed keeps its tail.
    #[test]
    fn the_lhs_copy_is_the_transpose() {
        for &(m, k, stride) in &[(1, 1, 1), (37, 70, 75), (64, 32, 32), (33, 65, 2048)] {
            let src: Vec<f32> = (0..m * stride).map(|i| i as f32).collect();
            let mut out = vec![-1.0; m * k + 3];
            // SAFETY: src holds m rows of `stride` ≥ k elements.
            unsafe { lhs_column_major(&mut out, m, k, src.as_ptr(), stride as isize) };
            for i in 0..m {
                for j in 0..k {
                    assert_eq!(out[i + j * m], src[i * stride + j], "({m}, {k}) [{i}, {j}]");
                }
            }
            assert_eq!(&out[m * k..], &[-1.0; 3]);
        }
    }

    /// The copy is made for the AVX-512 kernels only, for a row-major lhs with rows 2048 or
    /// more apart, of at least 2^18 elements, in a product at least 64 wide.
    #[test]
    fn which_products_copy_their_lhs() {
        let (avx512, avx2) = (GemmKernels::Avx512, GemmKernels::Avx2);
        assert!(transpose_lhs_first(avx512, (768, 400, 3072), 1, 3072));
        assert!(transpose_lhs_first(avx512, (128, 128, 2048), 1, 2048));
        assert!(!transpose_lhs_first(avx2, (768, 400, 3072), 1, 3072));
        assert!(!transpose_lhs_first(avx512, (768, 400, 3072), 3072, 1));
        assert!(!transpose_lhs_first(avx512, (2304, 400, 768), 1, 768));
        assert!(!transpose_lhs_first(avx512, (127, 400, 2048), 1, 2048));
        assert!(!transpose_lhs_first(avx512, (768, 63, 3072), 1, 3072));
    }

    /// Every kernel set this CPU runs against a naive f64 product, on row- and column-major
    /// operands and destinations, sizes below, at and past the register tiles, with and without
    /// reading dst.
    #[test]
    fn every_kernel_set_computes_the_product() {
        let sets: Vec<GemmKernels> = [GemmKernels::Avx512, GemmKernels::Avx2, GemmKernels::Crate]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect();
        let value =
            |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 1000) as f32 / 500.0 - 1.0;
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 70, 5),
            (65, 7, 33),
            (130, 97, 520),
            (400, 96, 64),
            // Large enough, with rows 2048 apart, for the AVX-512 kernels' copy of a row-major
            // lhs (`transpose_lhs_first`) on either side of the transposition to a column-major
            // dst.
            (128, 128, 2048),
        ] {
            let lhs: Vec<f32> = (0..m * k).map(|i| value(i, 1)).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| value(i, 2)).collect();
            let old: Vec<f32> = (0..m * n).map(|i| value(i, 3)).collect();
            let dots: Vec<f64> = (0..m * n)
                .map(|ij| {
                    let (i, j) = (ij / n, ij % n);
                    (0..k)
                        .map(|p| lhs[i * k + p] as f64 * rhs[p * n + j] as f64)
                        .sum()
                })
                .collect();
            for kernels in &sets {
                for (dst_col, lhs_col, rhs_col, read_dst) in [
                    (false, false, false, false),
                    (false, true, false, true),
                    (true, false, true, false),
                    (true, true, true, true),
                    (false, false, true, true),
                ] {
                    // (row stride, column stride) of an r × c matrix stored row- or column-major.
                    let strides = |r: usize, c: usize, col: bool| -> (isize, isize) {
                        if col {
                            (1, r as isize)
                        } else {
                            (c as isize, 1)
                        }
                    };
                    let (lrs, lcs) = strides(m, k, lhs_col);
                    let (rrs, rcs) = strides(k, n, rhs_col);
                    let (drs, dcs) = strides(m, n, dst_col);
                    // The same logical matrices in the chosen storage orders.
                    let store = |src: &[f32], r: usize, c: usize, (rs, cs): (isize, isize)| {
                        let mut out = vec![0f32; r * c];
                        for i in 0..r {
                            for j in 0..c {
                                out[i * rs as usize + j * cs as usize] = src[i * c + j];
                            }
                        }
                        out
                    };
                    let a = store(&lhs, m, k, (lrs, lcs));
                    let b = store(&rhs, k, n, (rrs, rcs));
                    let mut d = store(&old, m, n, (drs, dcs));
                    let (alpha, beta) = (0.5f32, 1.5f32);
                    // SAFETY: every pointer addresses a whole matrix of the given shape and
                    // strides; d is a separate buffer; `kernels` runs on this CPU (filtered).
                    unsafe {
                        sgemm(
                            *kernels,
                            (m, n, k),
                            (d.as_mut_ptr(), dcs, drs),
                            read_dst,
                            (a.as_ptr(), lcs, lrs),
                            (b.as_ptr(), rcs, rrs),
                            (alpha, beta),
                            Parallelism::Rayon(0),
                        )
                    };
                    for i in 0..m {
                        for j in 0..n {
                            let dot = dots[i * n + j];
                            let keep = if read_dst {
                                alpha as f64 * old[i * n + j] as f64
                            } else {
                                0.0
                            };
                            let want = keep + beta as f64 * dot;
                            let got = d[i * drs as usize + j * dcs as usize] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + k as f64),
                                "{kernels:?} ({m}, {n}, {k}) dst col {dst_col} lhs col {lhs_col} \
                                 rhs col {rhs_col} read {read_dst}: [{i}, {j}] {got} against {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The rule read independently from the kernel's view of the CPU (/proc/cpuinfo).
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn the_default_follows_the_flags_of_proc_cpuinfo() {
        let info = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
        let flags = info
            .lines()
            .find(|l| l.split(':').next().map(str::trim) == Some("flags"))
            .expect("no flags in /proc/cpuinfo");
        let flags = flags.split_once(':').unwrap().1;
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        let want = if has("avx512f") {
            GemmKernels::Avx512
        } else if has("fma") && has("avx2") {
            GemmKernels::Avx2
        } else {
            GemmKernels::Crate
        };
        assert_eq!(GemmKernels::for_this_cpu(), want);
    }

    #[test]
    fn the_environment_names_a_set_or_is_refused() {
        let default = GemmKernels::for_this_cpu();
        assert!(default.runs_here());
        for auto in [None, Some(""), Some("auto"), Some(" auto ")] {
            assert_eq!(GemmKernels::resolve(auto), Ok(default));
        }
        for (name, set) in [("avx512", GemmKernels::Avx512), ("avx2", GemmKernels::Avx2)] {
            let want = if set.runs_here() { set } else { default };
            assert_eq!(GemmKernels::resolve(Some(name)), Ok(want));
            assert_eq!(set.name(), name);
        }
        let err = GemmKernels::resolve(Some("avx1024")).unwrap_err();
        assert!(
            err.contains("avx1024") && err.contains("avx512, avx2 or auto"),
            "{err}"
        );
    }
}
