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
    let mut y: Vec<T> = Vec::with_capacity(rows * out);
    for _ in 0..rows {
        y.extend_from_slice(b);
    }
    // SAFETY: y holds rows × out (filled above), x rows × in and w out × in (their lengths come
    // from the shapes checked by `data`); y is a fresh buffer.
    unsafe {
        matmul(
            (rows, out, inp),
            (y.as_mut_ptr(), out, 1),
            (x.as_ptr(), inp, 1),
            (w.as_ptr(), 1, inp),
            true,
            (T::one(), T::one()),
            parallelism(),
        );
    }
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
    // SAFETY: dx (rows × in) and dw (out × in) are disjoint slices of g of exactly those sizes;
    // dy is rows × out, x rows × in and w out × in, as `data` checked against the shapes.
    unsafe {
        // dx (rows × in) = dy (rows × out) · W (out × in)
        if with_dx {
            matmul(
                (rows, inp, out),
                (dx.as_mut_ptr(), inp, 1),
                (dy.as_ptr(), out, 1),
                (w.as_ptr(), inp, 1),
                false,
                (T::zero(), T::one()),
                parallelism(),
            );
        }
        // dW (out × in) = dyᵀ (out × rows) · x (rows × in)
        matmul(
            (out, inp, rows),
            (dw.as_mut_ptr(), inp, 1),
            (dy.as_ptr(), 1, out),
            (x.as_ptr(), inp, 1),
            false,
            (T::zero(), T::one()),
            parallelism(),
        );
    }
    for row in dy.chunks_exact(out) {
        for (d, &v) in db.iter_mut().zip(row) {
            *d += v;
        }
    }
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
