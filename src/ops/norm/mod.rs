//! Normalisation over the last dimension, forward and backward: RMSNorm, LayerNorm (weight,
//! optional bias), group norm (xLSTM's multi-head norm: a group per head, one weight across
//! the row), and the residual add of Mamba's blocks fused in front of any of them.
//!
//! Semantics are mamba-ssm's (`mamba_ssm/ops/triton/layer_norm.py`: `layer_norm_ref` and
//! `rms_norm_ref` with `upcast=True`, and `layer_norm_fn` / `rms_norm_fn` with `prenorm=True,
//! residual_in_fp32=True` for [`add_norm`]); the group norm is `torch.nn.functional.group_norm`
//! over `(rows, groups * dim)` as NX-AI xLSTM's `MultiHeadLayerNorm` (`xlstm/components/ln.py`)
//! calls it. Statistics and products are f32 (f64 on the CPU), rounded once to the element
//! type:
//!
//! `z = x (+ residual)`, per group: `mean = sum z / dim` (0 for RMSNorm),
//! `rstd = 1 / sqrt(sum (z - mean)^2 / dim + eps)`, `y = (z - mean) * rstd * weight + bias`.
//!
//! `x`, `y`, `dy`, `dx`: `(..., groups * dim)` in f32, bf16 or f16; `weight`, `bias` and their
//! gradients `(groups * dim)` f32 (master weights stay f32); `residual` and the sum `z` that
//! [`add_norm`] returns are f32 (the residual stream); `mean` and `rstd` are f32, one per group
//! of each row, saved by the forward for the backward. The weight and bias gradients are summed
//! in a fixed order (no float atomics): repeated calls on one device agree bit for bit.

pub mod bench;
pub mod check;
pub(crate) mod cli;
pub mod cpu;
mod cuda;

/// The norms in the CLI's `check`, `bench norm` and `run`.
pub const ENTRY: crate::ops::registry::OpEntry = crate::ops::registry::OpEntry {
    name: "norm",
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

/// RMSNorm (no mean subtracted) or LayerNorm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    Rms,
    Layer,
}

/// Which norm: its kind, eps, and how many groups each row of `x` is normalised in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Norm {
    pub kind: NormKind,
    pub eps: f32,
    /// Groups per row (1: the whole row; xLSTM's multi-head norm: the number of heads).
    pub groups: usize,
}

impl Norm {
    pub const fn rms(eps: f32) -> Norm {
        Norm { kind: NormKind::Rms, eps, groups: 1 }
    }

    pub const fn layer(eps: f32) -> Norm {
        Norm { kind: NormKind::Layer, eps, groups: 1 }
    }

    /// The same norm applied per group of `groups` contiguous equal parts of each row.
    pub const fn grouped(self, groups: usize) -> Norm {
        Norm { groups, ..self }
    }
}

/// What the backward needs from the forward: the norm, and per group of each row `rstd` and
/// (LayerNorm) `mean`, f32 of shape `(..., groups)` (`(...)` when `groups` is 1).
#[derive(Clone, Debug)]
pub struct NormStats {
    pub norm: Norm,
    pub mean: Option<Tensor>,
    pub rstd: Tensor,
}

/// The forward's output `y` (x's dtype) and statistics.
#[derive(Clone, Debug)]
pub struct NormOutput {
    pub y: Tensor,
    pub stats: NormStats,
}

/// [`add_norm`]'s output: `y`, the f32 sum `z = x + residual` (the residual stream the next
/// block adds to, and the normalised input its backward takes), and the statistics.
#[derive(Clone, Debug)]
pub struct AddNormOutput {
    pub y: Tensor,
    pub residual: Tensor,
    pub stats: NormStats,
}

/// Gradients of `sum(y * dy)` (plus `sum(z * dresidual)` for [`add_norm_backward`]).
#[derive(Clone, Debug)]
pub struct NormGrads {
    /// With respect to `x`, in dy's dtype.
    pub dx: Tensor,
    /// [`add_norm_backward`]: with respect to the residual, f32 (the same values as dx, kept
    /// in f32 for the residual stream). None from [`norm_backward`].
    pub dresidual: Option<Tensor>,
    pub dweight: Tensor,
    /// When the forward had a bias.
    pub dbias: Option<Tensor>,
}

/// Validated sizes: `rows` rows of x (the product of its leading dimensions), each
/// `groups` groups of `dim` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormDims {
    pub rows: usize,
    pub groups: usize,
    pub dim: usize,
    /// The type of x, y, dy and dx.
    pub dtype: DType,
}

impl NormDims {
    /// Groups over all rows: the statistics' count.
    pub fn group_rows(&self) -> usize {
        self.rows * self.groups
    }

    /// The shape of mean and rstd for an x of `shape`.
    fn stats_shape(&self, shape: &[usize]) -> Vec<usize> {
        let mut s = shape[..shape.len() - 1].to_vec();
        if self.groups > 1 {
            s.push(self.groups);
        }
        s
    }
}

fn check_norm(norm: &Norm) -> Result<()> {
    if !(norm.eps.is_finite() && norm.eps > 0.0) {
        return Err(Error::invalid("eps", "a finite value > 0", norm.eps.to_string()));
    }
    if norm.groups == 0 {
        return Err(Error::invalid("groups", "at least 1", "0"));
    }
    Ok(())
}

/// Checks `x` (`arg`: x, or the residual sum) against the weight and bias and returns the sizes.
fn dims(arg: &'static str, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, norm: &Norm) -> Result<NormDims> {
    check_norm(norm)?;
    let Some((&width, lead)) = x.shape().split_last() else {
        return Err(Error::invalid(arg, "a tensor of shape (..., dim), rank >= 1", "a scalar (rank 0)"));
    };
    if width == 0 || width % norm.groups != 0 {
        return Err(Error::invalid(
            arg,
            format!("a last dimension that is a positive multiple of groups = {}", norm.groups),
            format!("shape {:?}", x.shape()),
        ));
    }
    let device = x.device();
    for (name, t) in [("weight", Some(weight)), ("bias", bias)] {
        if let Some(t) = t {
            t.expect_shape(name, &[width])?;
            t.expect_dtype(name, DType::F32)?;
            t.expect_device(name, &device)?;
        }
    }
    let rows = crate::tensor::elem_count(arg, lead)?;
    let group_rows = rows.checked_mul(norm.groups);
    if group_rows.is_none_or(|g| g > u32::MAX as usize) || width > u32::MAX as usize {
        return Err(Error::invalid(
            arg,
            "fewer than 2^32 groups over all rows and a last dimension below 2^32",
            format!("shape {:?} with {} groups", x.shape(), norm.groups),
        ));
    }
    crate::memory::check_buffers(
        &device,
        &[(arg, Some(x.elem_count()), x.dtype().size_in_bytes()), (arg, Some(x.elem_count()), 4), (arg, group_rows, 8)],
    )?;
    Ok(NormDims { rows, groups: norm.groups, dim: width / norm.groups, dtype: x.dtype() })
}

/// `y = norm(x) * weight + bias` over the last dimension (by groups), and the statistics.
pub fn norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, norm: Norm) -> Result<NormOutput> {
    let d = dims("x", x, weight, bias, &norm)?;
    let (y, _, stats) = forward(x, None, weight, bias, norm, &d, false)?;
    Ok(NormOutput { y, stats })
}

/// RMSNorm: `y = x * rstd * weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<NormOutput> {
    norm(x, weight, None, Norm::rms(eps))
}

/// LayerNorm: `y = (x - mean) * rstd * weight + bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f32) -> Result<NormOutput> {
    norm(x, weight, bias, Norm::layer(eps))
}

/// The residual add fused into the norm (Mamba's block entry, `residual_in_fp32`):
/// `z = x + residual` in f32 (`z = x` without a residual, the first block), `y = norm(z)` in
/// x's dtype. Returns y, z and the statistics.
pub fn add_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    norm: Norm,
) -> Result<AddNormOutput> {
    let d = dims("x", x, weight, bias, &norm)?;
    if let Some(r) = residual {
        r.expect_shape("residual", x.shape())?;
        r.expect_dtype("residual", DType::F32)?;
        r.expect_device("residual", &x.device())?;
    }
    let (y, z, stats) = forward(x, residual, weight, bias, norm, &d, true)?;
    let residual = z.ok_or_else(|| Error::invalid("x", "a forward that writes the residual sum", "none"))?;
    Ok(AddNormOutput { y, residual, stats })
}

fn forward(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    norm: Norm,
    d: &NormDims,
    write_z: bool,
) -> Result<(Tensor, Option<Tensor>, NormStats)> {
    let stats_shape = d.stats_shape(x.shape());
    match x.device() {
        Device::Cpu => {
            let z = match residual {
                Some(r) => cpu::residual_sum(&x.to_f64_vec()?, &r.to_f64_vec()?),
                None => x.to_f64_vec()?,
            };
            let f = cpu::forward(
                &z,
                &weight.to_f64_vec()?,
                bias.map(|b| b.to_f64_vec()).transpose()?.as_deref(),
                d,
                norm.kind,
                f64::from(norm.eps),
            );
            let mean = match norm.kind {
                NormKind::Layer => Some(Tensor::from_f64_rounded(&f.mean, &stats_shape, DType::F32)?),
                NormKind::Rms => None,
            };
            let z = if write_z { Some(Tensor::from_f64_rounded(&f.z, x.shape(), DType::F32)?) } else { None };
            Ok((
                Tensor::from_f64_rounded(&f.y, x.shape(), d.dtype)?,
                z,
                NormStats { norm, mean, rstd: Tensor::from_f64_rounded(&f.rstd, &stats_shape, DType::F32)? },
            ))
        }
        Device::Cuda(dev) => cuda::forward(&dev, x, residual, weight, bias, norm, d, &stats_shape, write_z),
    }
}

fn check_stats(stats: &NormStats, d: &NormDims, shape: &[usize], device: &Device) -> Result<()> {
    let want = d.stats_shape(shape);
    for (name, t) in [("rstd", Some(&stats.rstd)), ("mean", stats.mean.as_ref())] {
        if let Some(t) = t {
            t.expect_shape(name, &want)?;
            t.expect_dtype(name, DType::F32)?;
            t.expect_device(name, device)?;
        }
    }
    match (stats.norm.kind, &stats.mean) {
        (NormKind::Layer, None) => Err(Error::invalid("stats", "LayerNorm statistics with a mean", "no mean")),
        (NormKind::Rms, Some(_)) => Err(Error::invalid("stats", "RMSNorm statistics without a mean", "a mean")),
        _ => Ok(()),
    }
}

/// Gradients of `sum(y * dy)` with respect to `x`, `weight` and (when `bias` is given, as in
/// the forward) `bias`, from the forward's statistics.
pub fn norm_backward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stats: &NormStats,
    dy: &Tensor,
) -> Result<NormGrads> {
    let d = dims("x", x, weight, bias, &stats.norm)?;
    dy.expect_dtype("dy", d.dtype)?;
    backward(x, weight, bias.is_some(), stats, dy, None, false, &d)
}

/// The backward of [`add_norm`]: gradients of `sum(y * dy) + sum(z * dresidual)` (dresidual:
/// the gradient the residual stream carries back from the blocks after this one; none for the
/// last). `residual` is the sum [`add_norm`] returned. dx (in dy's dtype) and dresidual (f32)
/// hold the same values: the gradient of both x and the incoming residual.
pub fn add_norm_backward(
    residual: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stats: &NormStats,
    dy: &Tensor,
    dresidual: Option<&Tensor>,
) -> Result<NormGrads> {
    residual.expect_dtype("residual", DType::F32)?;
    let mut d = dims("residual", residual, weight, bias, &stats.norm)?;
    d.dtype = dy.dtype();
    if let Some(r) = dresidual {
        r.expect_shape("dresidual", residual.shape())?;
        r.expect_dtype("dresidual", DType::F32)?;
        r.expect_device("dresidual", &residual.device())?;
    }
    backward(residual, weight, bias.is_some(), stats, dy, dresidual, true, &d)
}

#[allow(clippy::too_many_arguments)]
fn backward(
    z: &Tensor,
    weight: &Tensor,
    want_dbias: bool,
    stats: &NormStats,
    dy: &Tensor,
    dresidual: Option<&Tensor>,
    write_dresidual: bool,
    d: &NormDims,
) -> Result<NormGrads> {
    let device = z.device();
    check_stats(stats, d, z.shape(), &device)?;
    dy.expect_shape("dy", z.shape())?;
    dy.expect_device("dy", &device)?;
    match device {
        Device::Cpu => {
            let mean = stats.mean.as_ref().map(|m| m.to_f64_vec()).transpose()?;
            let dres = dresidual.map(|r| r.to_f64_vec()).transpose()?;
            let g = cpu::backward(
                &z.to_f64_vec()?,
                &weight.to_f64_vec()?,
                mean.as_deref(),
                &stats.rstd.to_f64_vec()?,
                &dy.to_f64_vec()?,
                dres.as_deref(),
                d,
            );
            let width = d.groups * d.dim;
            Ok(NormGrads {
                dx: Tensor::from_f64_rounded(&g.dz, z.shape(), d.dtype)?,
                dresidual: if write_dresidual {
                    Some(Tensor::from_f64_rounded(&g.dz, z.shape(), DType::F32)?)
                } else {
                    None
                },
                dweight: Tensor::from_f64_rounded(&g.dweight, &[width], DType::F32)?,
                dbias: if want_dbias { Some(Tensor::from_f64_rounded(&g.dbias, &[width], DType::F32)?) } else { None },
            })
        }
        Device::Cuda(dev) => {
            cuda::backward(&dev, cuda::BackwardArgs { z, weight, want_dbias, stats, dy, dresidual, write_dresidual }, d)
        }
    }
}
