//! The f32 matrix products of the fused kernels through OpenBLAS's `cblas_sgemm` (cargo feature
//! `openblas`: links the system's libopenblas; Debian `libopenblas-dev`), for CPUs where it beats
//! the `gemm` crate (BENCHMARKS.md, "Matrix products"); results differ from the `gemm` crate's
//! by rounding only.

use std::ffi::c_int;

#[link(name = "openblas")]
extern "C" {
    fn cblas_sgemm(
        order: c_int,
        trans_a: c_int,
        trans_b: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    );
}

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// How CBLAS reads a row-major operand with strides (rs, cs): as stored (cs = 1) or transposed
/// (rs = 1), with its leading dimension; `None` for other layouts.
fn operand(rs: usize, cs: usize, cols: usize, rows: usize) -> Option<(c_int, c_int)> {
    let ld = |v: usize| c_int::try_from(v.max(1)).ok();
    if cs == 1 && rs >= cols {
        Some((NO_TRANS, ld(rs)?))
    } else if rs == 1 && cs >= rows {
        Some((TRANS, ld(cs)?))
    } else {
        None
    }
}

/// dst (m × n) = alpha·dst + beta·lhs·rhs as `ops::cpu::matmul` defines it, by `cblas_sgemm`;
/// false (nothing done) when CBLAS cannot take these strides or sizes.
///
/// # Safety
/// The contract of `ops::cpu::matmul`.
// SAFETY: an unsafe fn whose contract is the "# Safety" section above; it forwards the pointers
// to cblas_sgemm with leading dimensions that address the same elements.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize, usize),
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    read_dst: bool,
    (alpha, beta): (f32, f32),
) -> bool {
    let dims = (c_int::try_from(m), c_int::try_from(n), c_int::try_from(k));
    let (Ok(m_), Ok(n_), Ok(k_)) = dims else {
        return false;
    };
    let (Some((ta, lda)), Some((tb, ldb))) =
        (operand(lhs.1, lhs.2, k, m), operand(rhs.1, rhs.2, n, k))
    else {
        return false;
    };
    if dst.2 != 1 || dst.1 < n || m == 0 || n == 0 {
        return false;
    }
    let Ok(ldc) = c_int::try_from(dst.1) else {
        return false;
    };
    // CBLAS: C = α·A·B + β·C; here the product's factor is `beta` and dst's is `alpha`.
    let c_beta = if read_dst { alpha } else { 0.0 };
    cblas_sgemm(
        ROW_MAJOR, ta, tb, m_, n_, k_, beta, lhs.0, lda, rhs.0, ldb, c_beta, dst.0, ldc,
    );
    true
}
