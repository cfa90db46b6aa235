//! RMSNorm over the last dimension, forward and backward, with mamba-ssm's semantics
//! (`mamba_ssm/ops/triton/layer_norm.py`, `rms_norm_ref` with `upcast=True`, no bias, no
//! residual): the statistics and the product in f32 (f64 on the CPU), rounded once to the
//! element type,
//!
//! `rstd = 1 / sqrt(mean(x^2) + eps)`, `y = x * rstd * weight`.
//!
//! `x`, `y`, `dy`, `dx`: `(..., dim)` in f32, bf16 or f16; `weight` and its gradient `(dim)` f32
//! (master weights stay f32); `rstd` `(...)` f32, saved by the forward for the backward. The
//! weight gradient is summed in a fixed order (no float atomics): repeated calls agree bit for
//! bit.

pub mod bench;
pub mod check;
pub(crate) mod cli;
pub mod cpu;
mod cuda;

/// RMSNorm in the CLI's `check`, `bench norm` and `run`.
pub const ENTRY: crate::ops::registry::OpEntry = crate::ops::registry::OpEntry {
    name: "rms_norm",
    bench_group: "norm",
    check: check::check_rows,
    bench: bench::bench_rows,
    run: cli::COMMANDS,
};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// mamba-ssm's `RMSNorm` default eps.
pub const DEFAULT_EPS: f32 = 1e-5;

/// The forward's output and the per-row `1 / sqrt(mean(x^2) + eps)` the backward takes.
#[derive(Clone, Debug)]
pub struct RmsNormOutput {
    pub y: Tensor,
    pub rstd: Tensor,
}

/// Gradients of `sum(y * dy)`.
#[derive(Clone, Debug)]
pub struct RmsNormGrads {
    pub dx: Tensor,
    pub dweight: Tensor,
}

/// Validated sizes: `rows` (the product of x's leading dimensions) of `dim` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RmsNormDims {
    pub rows: usize,
    pub dim: usize,
    pub dtype: DType,
}

fn dims(x: &Tensor, weight: &Tensor) -> Result<RmsNormDims> {
    let Some((&dim, lead)) = x.shape().split_last() else {
        return Err(Error::invalid("x", "a tensor of shape (..., dim), rank >= 1", "a scalar (rank 0)"));
    };
    if dim == 0 {
        return Err(Error::invalid("x", "a last dimension of at least 1", format!("shape {:?}", x.shape())));
    }
    weight.expect_shape("weight", &[dim])?;
    weight.expect_dtype("weight", DType::F32)?;
    let device = x.device();
    weight.expect_device("weight", &device)?;
    let rows = crate::tensor::elem_count("x", lead)?;
    if rows > u32::MAX as usize || dim > u32::MAX as usize {
        return Err(Error::invalid("x", "fewer than 2^32 rows and a dim below 2^32", format!("shape {:?}", x.shape())));
    }
    crate::memory::check_buffers(
        &device,
        &[("x", Some(x.elem_count()), x.dtype().size_in_bytes()), ("x", Some(rows), 4)],
    )?;
    Ok(RmsNormDims { rows, dim, dtype: x.dtype() })
}

fn check_eps(eps: f32) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::invalid("eps", "a finite value > 0", eps.to_string()));
    }
    Ok(())
}

/// `y = x * rstd * weight` over the last dimension, and `rstd`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<RmsNormOutput> {
    check_eps(eps)?;
    let d = dims(x, weight)?;
    match x.device() {
        Device::Cpu => {
            let (y, rstd) = cpu::forward(&x.to_f64_vec()?, &weight.to_f64_vec()?, d.dim, f64::from(eps));
            Ok(RmsNormOutput {
                y: Tensor::from_f64_rounded(&y, x.shape(), d.dtype)?,
                rstd: Tensor::from_f64_rounded(&rstd, &x.shape()[..x.rank() - 1], DType::F32)?,
            })
        }
        Device::Cuda(dev) => cuda::forward(&dev, x, weight, eps, &d),
    }
}

/// Gradients of `sum(y * dy)` with respect to `x` and `weight`, from the forward's `rstd`.
pub fn rms_norm_backward(x: &Tensor, weight: &Tensor, rstd: &Tensor, dy: &Tensor) -> Result<RmsNormGrads> {
    let d = dims(x, weight)?;
    let device = x.device();
    rstd.expect_shape("rstd", &x.shape()[..x.rank() - 1])?;
    rstd.expect_dtype("rstd", DType::F32)?;
    rstd.expect_device("rstd", &device)?;
    dy.expect_shape("dy", x.shape())?;
    dy.expect_dtype("dy", d.dtype)?;
    dy.expect_device("dy", &device)?;
    match device {
        Device::Cpu => {
            let (dx, dw) =
                cpu::backward(&x.to_f64_vec()?, &weight.to_f64_vec()?, &rstd.to_f64_vec()?, &dy.to_f64_vec()?, d.dim);
            Ok(RmsNormGrads {
                dx: Tensor::from_f64_rounded(&dx, x.shape(), d.dtype)?,
                dweight: Tensor::from_f64_rounded(&dw, &[d.dim], DType::F32)?,
            })
        }
        Device::Cuda(dev) => cuda::backward(&dev, x, weight, rstd, dy, &d),
    }
}
