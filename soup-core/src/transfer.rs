//! Every copy of tensor data to or from host numbers that soup-core makes, counted.
//!
//! On a GPU these are the transfers over the bus that a MEHL step must keep few: the loss, the
//! projection ⟨∇θ, d_i⟩ and the global norm of ∇θ come back as one small vector each, X goes out
//! as one b × L matrix (spec §3.3), whatever the number of tensors. On the CPU they are copies
//! into host vectors; either way their number per step must not grow with the number of tensors,
//! which `verify` checks with [`count`] on the device-portable path ([`crate::RunOptions::portable`]).
//! The crate's clippy configuration forbids the candle calls these wrap anywhere else.
#![allow(clippy::disallowed_methods)]

use std::cell::Cell;

use candle_core::{DType, Device, Shape, Tensor};

use crate::error::Result;

thread_local! {
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

/// Transfers made so far by this thread (the MEHL driver runs on the thread that calls it).
pub fn count() -> u64 {
    COUNT.with(Cell::get)
}

fn counted() {
    COUNT.with(|c| c.set(c.get() + 1));
}

/// The single element of `t` (any shape of one element, any float dtype), as f64.
pub fn scalar(t: &Tensor) -> Result<f64> {
    counted();
    Ok(t.flatten_all()?
        .to_dtype(DType::F64)?
        .squeeze(0)?
        .to_scalar::<f64>()?)
}

/// The elements of `t` in row-major order, as f64.
pub fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    counted();
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// The elements of `t` in row-major order, as `T` (its dtype).
pub fn to_vec_of<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    counted();
    Ok(t.flatten_all()?.to_vec1::<T>()?)
}

/// Host numbers `v` as a tensor of `shape` and `dtype` on `device`.
pub fn upload(v: &[f64], shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    counted();
    Ok(Tensor::from_slice(v, shape, device)?.to_dtype(dtype)?)
}

/// Host values `v` (already of the tensor's element type) as a tensor of `shape` on `device`.
pub fn upload_vec<T: candle_core::WithDType>(
    v: Vec<T>,
    shape: impl Into<Shape>,
    device: &Device,
) -> Result<Tensor> {
    counted();
    Ok(Tensor::from_vec(v, shape, device)?)
}
