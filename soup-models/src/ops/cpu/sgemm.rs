//! Which of the `gemm` crate's f32 micro-kernels the fused kernels' matrix products run, chosen
//! once per process from the CPU.
//!
//! The `gemm` crate (built with its `x86-v4` feature) picks its AVX-512 kernels whenever the CPU
//! has `avx512f`. Measured side by side (BENCHMARKS.md, "The `gemm` crate's AVX-512 kernels" and
//! "Issue [perf-2] on an Intel Xeon"), the ViT-B/32 training step took 0.72–0.89× the AVX2
//! kernels' time on two Intel Xeons and 1.23× on an AMD EPYC with AVX-512 (its generation was not
//! recorded; Zen 4 splits 512-bit operations into 256-bit halves, Zen 5 has full-width units and
//! may differ: `SOUP_GEMM_KERNELS=avx512` tries it). So soup calls the kernels itself:
//!
//! - AVX-512 kernels where the CPU has `avx512f` and is not an AMD CPU;
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
        if GemmKernels::Avx512.runs_here() && !amd() {
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

/// Whether the CPU's vendor string is AMD's.
fn amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU and only reads identification registers.
        #[allow(unused_unsafe)]
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&id.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&id.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&id.ecx.to_le_bytes());
        &vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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
pub(crate) unsafe fn sgemm(
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
                return unsafe {
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
            GemmKernels::Crate => {}
        }
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
        ] {
            let lhs: Vec<f32> = (0..m * k).map(|i| value(i, 1)).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| value(i, 2)).collect();
            let old: Vec<f32> = (0..m * n).map(|i| value(i, 3)).collect();
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
                            let dot: f64 = (0..k)
                                .map(|p| lhs[i * k + p] as f64 * rhs[p * n + j] as f64)
                                .sum();
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
    fn the_default_follows_the_vendor_and_flags_of_proc_cpuinfo() {
        let info = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
        let field = |name: &str| -> String {
            let line = info
                .lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(name))
                .unwrap_or_else(|| panic!("no {name} in /proc/cpuinfo"));
            line.split_once(':').unwrap().1.trim().to_string()
        };
        let flags = field("flags");
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        let amd = field("vendor_id") == "AuthenticAMD";
        let want = if has("avx512f") && !amd {
            GemmKernels::Avx512
        } else if has("fma") && has("avx2") {
            GemmKernels::Avx2
        } else {
            GemmKernels::Crate
        };
        assert_eq!(GemmKernels::for_this_cpu(), want, "vendor AMD: {amd}");
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
