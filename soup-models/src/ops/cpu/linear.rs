//! Linear: y = x Wᵀ + b, x (rows × in), W (out × in), b (out).

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{data, matmul, parallelism, Real};

/// x Wᵀ + b for a 2-D x; without a bias, x Wᵀ.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let b = match b {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(w.dim(0)?, w.dtype(), w.device())?,
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &b, Linear)
}

struct Linear;

fn linear_dims(x: &Layout, w: &Layout, b: &Layout) -> Result<(usize, usize, usize)> {
    let (rows, inp) = x.shape().dims2()?;
    let (out, win) = w.shape().dims2()?;
    if win != inp || b.shape().elem_count() != out {
        bail!(
            "linear: x {:?}, weight {:?}, bias {:?} do not fit",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    Ok((rows, inp, out))
}

fn linear_fwd<T: Real>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (rows, inp, out) = linear_dims(l1, l2, l3)?;
    let (x, w, b) = (
        data::<T>(s1, l1, "linear")?,
        data::<T>(s2, l2, "linear")?,
        data::<T>(s3, l3, "linear")?,
    );
    let mut y = vec![T::zero(); rows * out];
    linear_into(x, w, Some(b), false, (rows, inp, out), (&mut y, out));
    Ok((T::to_cpu_storage_owned(y), Shape::from((rows, out))))
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "soup-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, "linear", linear_fwd((s1, l1), (s2, l2), (s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = x.dims2()?;
        let out = w.dim(0)?;
        // The input of a first layer (images) needs no gradient: skip its product.
        let with_dx = x.track_op();
        let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &LinearBwd { with_dx })?;
        let dx = match with_dx {
            true => Some(packed.narrow(0, 0, rows * inp)?.reshape((rows, inp))?),
            false => None,
        };
        let dw = packed
            .narrow(0, rows * inp, out * inp)?
            .reshape((out, inp))?;
        let db = match b.track_op() {
            true => Some(
                packed
                    .narrow(0, (rows + out) * inp, out)?
                    .reshape(b.shape())?,
            ),
            false => None,
        };
        Ok((dx, Some(dw), db))
    }
}

/// (x, W, dy) → [dx = dy W | dW = dyᵀ x | db = Σ_rows dy], packed in one vector (dx left zero
/// unless `with_dx`).
struct LinearBwd {
    with_dx: bool,
}

fn linear_bwd<T: Real>(
    with_dx: bool,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (rows, inp) = l1.shape().dims2()?;
    let (out, _) = l2.shape().dims2()?;
    if l3.shape().dims2()? != (rows, out) {
        bail!("linear backward: the gradient has shape {:?}", l3.dims());
    }
    let (x, w, dy) = (
        data::<T>(s1, l1, "linear")?,
        data::<T>(s2, l2, "linear")?,
        data::<T>(s3, l3, "linear")?,
    );
    let total = rows * inp + out * inp + out;
    let mut g: Vec<T> = vec![T::zero(); total];
    let (dx, rest) = g.split_at_mut(rows * inp);
    let (dw, db) = rest.split_at_mut(out * inp);
    let dx = with_dx.then_some((dx, false));
    linear_backward_into(x, w, (dy, out), (rows, inp, out), dx, dw, Some(db));
    Ok((T::to_cpu_storage_owned(g), Shape::from(total)))
}

impl CustomOp3 for LinearBwd {
    fn name(&self) -> &'static str {
        "soup-linear-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(
            s1,
            "linear backward",
            linear_bwd(self.with_dx, (s1, l1), (s2, l2), (s3, l3))
        )
    }
}

/// y (rows × out, row stride `y_rs`) = x (rows × in) Wᵀ + b, W (out × in); without a bias x Wᵀ;
/// with `accumulate`, y + x Wᵀ + b (a residual stream). y may be a column range of a wider
/// matrix (q, k and v side by side): only its first `out` columns of each row are written.
pub(crate) fn linear_into<T: Real>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    accumulate: bool,
    (rows, inp, out): (usize, usize, usize),
    (y, y_rs): (&mut [T], usize),
) {
    if rows == 0 || out == 0 {
        return;
    }
    assert!(x.len() >= rows * inp && w.len() == out * inp && y_rs >= out);
    assert!(y.len() >= (rows - 1) * y_rs + out);
    if let Some(b) = b {
        assert_eq!(b.len(), out);
        for r in 0..rows {
            let row = &mut y[r * y_rs..r * y_rs + out];
            if accumulate {
                for (v, &bj) in row.iter_mut().zip(b) {
                    *v += bj;
                }
            } else {
                row.copy_from_slice(b);
            }
        }
    }
    // SAFETY: y addresses rows × out elements with row stride y_rs, x rows × in and w out × in
    // (lengths asserted above); y is a &mut slice, so it overlaps neither x nor w.
    unsafe {
        matmul(
            (rows, out, inp),
            (y.as_mut_ptr(), y_rs, 1),
            (x.as_ptr(), inp, 1),
            (w.as_ptr(), 1, inp),
            accumulate || b.is_some(),
            (T::one(), T::one()),
            parallelism(),
        );
    }
}

/// The backward of [`linear_into`] for dy (rows × out, row stride `dy_rs`): dW = dyᵀ x into `dw`
/// (out × in), db = Σ_rows dy into `db`, and, when `dx` is given, dx = dy W (rows × in) written,
/// or added to what dx holds when its flag is true.
pub(crate) fn linear_backward_into<T: Real>(
    x: &[T],
    w: &[T],
    (dy, dy_rs): (&[T], usize),
    (rows, inp, out): (usize, usize, usize),
    dx: Option<(&mut [T], bool)>,
    dw: &mut [T],
    db: Option<&mut [T]>,
) {
    linear_backward_with(x, w, (dy, dy_rs), (rows, inp, out), dx, (dw, false), db)
}

/// [`linear_backward_into`] with dW added to what `dw` holds when its flag is true (a weight
/// used twice, or rows taken in chunks).
pub(crate) fn linear_backward_with<T: Real>(
    x: &[T],
    w: &[T],
    (dy, dy_rs): (&[T], usize),
    (rows, inp, out): (usize, usize, usize),
    dx: Option<(&mut [T], bool)>,
    (dw, dw_accumulate): (&mut [T], bool),
    db: Option<&mut [T]>,
) {
    assert!(x.len() >= rows * inp && w.len() == out * inp && dw.len() == out * inp);
    assert!(dy_rs >= out && (rows == 0 || dy.len() >= (rows - 1) * dy_rs + out));
    if rows == 0 || out == 0 {
        if !dw_accumulate {
            dw.fill(T::zero());
        }
        if let Some(db) = db {
            db.fill(T::zero());
        }
        return;
    }
    // SAFETY: dx (rows × in) and dw (out × in) are &mut slices of at least those sizes
    // (asserted), so they overlap nothing else; dy addresses rows × out elements with row stride
    // dy_rs, x rows × in and w out × in, as asserted above.
    unsafe {
        if let Some((dx, accumulate)) = dx {
            assert!(dx.len() >= rows * inp);
            // dx (rows × in) (+)= dy (rows × out) · W (out × in)
            matmul(
                (rows, inp, out),
                (dx.as_mut_ptr(), inp, 1),
                (dy.as_ptr(), dy_rs, 1),
                (w.as_ptr(), inp, 1),
                accumulate,
                (T::one(), T::one()),
                parallelism(),
            );
        }
        // dW (out × in) = dyᵀ (out × rows) · x (rows × in)
        matmul(
            (out, inp, rows),
            (dw.as_mut_ptr(), inp, 1),
            (dy.as_ptr(), 1, dy_rs),
            (x.as_ptr(), inp, 1),
            dw_accumulate,
            (if dw_accumulate { T::one() } else { T::zero() }, T::one()),
            parallelism(),
        );
    }
    if let Some(db) = db {
        assert_eq!(db.len(), out);
        db.fill(T::zero());
        for r in 0..rows {
            for (d, &v) in db.iter_mut().zip(&dy[r * dy_rs..r * dy_rs + out]) {
                *d += v;
            }
        }
    }
}
