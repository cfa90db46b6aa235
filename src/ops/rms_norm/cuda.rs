//! Launches of `cuda/rms_norm.cu`.

use super::{RmsNormDims, RmsNormGrads, RmsNormOutput};
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::Result;
use crate::kernels::{kernel_name, KernelModule};
use crate::tensor::{CudaElement, Tensor};
use cudarc::driver::{DeviceRepr, PushKernelArg};
use half::{bf16, f16};

/// Mirrors `hk_rms::RmsParams` in cuda/rms_norm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RmsParams {
    rows: u32,
    dim: u32,
    eps: f32,
    blocks: u32,
}
crate::kernels::assert_kernel_params!(RmsParams, 4);

// SAFETY: four 4-byte fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for RmsParams {}

/// `hk_rms::THREADS`: the kernels' block reduction assumes exactly this many threads.
const THREADS: u32 = 256;

pub(super) fn forward(dev: &CudaDevice, x: &Tensor, w: &Tensor, eps: f32, d: &RmsNormDims) -> Result<RmsNormOutput> {
    match d.dtype {
        DType::F32 => forward_typed::<f32>(dev, x, w, eps, d),
        DType::BF16 => forward_typed::<bf16>(dev, x, w, eps, d),
        DType::F16 => forward_typed::<f16>(dev, x, w, eps, d),
    }
}

pub(super) fn backward(
    dev: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    d: &RmsNormDims,
) -> Result<RmsNormGrads> {
    match d.dtype {
        DType::F32 => backward_typed::<f32>(dev, x, w, rstd, dy, d),
        DType::BF16 => backward_typed::<bf16>(dev, x, w, rstd, dy, d),
        DType::F16 => backward_typed::<f16>(dev, x, w, rstd, dy, d),
    }
}

fn forward_typed<T: CudaElement>(
    dev: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    d: &RmsNormDims,
) -> Result<RmsNormOutput> {
    // SAFETY (allocations): rms_norm_fwd writes every element of y and rstd (a block per row).
    let mut y = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, x.shape())? };
    let mut rstd = unsafe { Tensor::cuda_uninit(dev, DType::F32, &x.shape()[..x.rank() - 1])? };
    if d.rows == 0 {
        return Ok(RmsNormOutput { y, rstd });
    }
    let kernel = kernel_name("rms_norm", "fwd", T::DTYPE, "");
    let f = dev.function(KernelModule::RmsNorm, &kernel)?;
    let cfg = dev.grid_stride_config(KernelModule::RmsNorm, &kernel, THREADS, d.rows, 1)?;
    let p = RmsParams { rows: d.rows as u32, dim: d.dim as u32, eps, blocks: cfg.grid_dim.0 };
    let mut args = dev.stream().launch_builder(&f);
    args.arg(x.cuda_slice::<T>("x")?)
        .arg(w.cuda_slice::<f32>("weight")?)
        .arg(y.cuda_slice_mut::<T>("y")?)
        .arg(rstd.cuda_slice_mut::<f32>("rstd")?)
        .arg(&p);
    // SAFETY: rms_norm_fwd_<T>(const T* x, const float* w, T* y, float* rstd, RmsParams): x and
    // y hold rows * dim elements, w dim, rstd rows (validated in `dims`, both below 2^32); the
    // block has THREADS threads, as its reduction needs.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching rms_norm_fwd", e))?;
    Ok(RmsNormOutput { y, rstd })
}

fn backward_typed<T: CudaElement>(
    dev: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    d: &RmsNormDims,
) -> Result<RmsNormGrads> {
    let kernel = kernel_name("rms_norm", "bwd", T::DTYPE, "");
    let f = dev.function(KernelModule::RmsNorm, &kernel)?;
    // At least one block, also without rows: it zeroes its partial row, so dweight is 0.
    let cfg = dev.grid_stride_config(KernelModule::RmsNorm, &kernel, THREADS, d.rows, 1)?;
    let blocks = cfg.grid_dim.0;
    let p = RmsParams { rows: d.rows as u32, dim: d.dim as u32, eps: 0.0, blocks };
    crate::memory::check_buffers(
        &crate::device::Device::Cuda(dev.clone()),
        &[("x", (blocks as usize).checked_mul(d.dim), 4)],
    )?;
    // SAFETY (allocations): rms_norm_bwd writes every element of dx (a block per row) and of
    // its blocks' partial rows (zeroed first); rms_norm_dweight every element of dweight.
    let mut dx = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, x.shape())? };
    let mut partial = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[blocks as usize, d.dim])? };
    let mut dweight = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[d.dim])? };
    let mut args = dev.stream().launch_builder(&f);
    args.arg(x.cuda_slice::<T>("x")?)
        .arg(w.cuda_slice::<f32>("weight")?)
        .arg(rstd.cuda_slice::<f32>("rstd")?)
        .arg(dy.cuda_slice::<T>("dy")?)
        .arg(dx.cuda_slice_mut::<T>("dx")?)
        .arg(partial.cuda_slice_mut::<f32>("partial")?)
        .arg(&p);
    // SAFETY: rms_norm_bwd_<T>(x, w, rstd, dy, dx, float* partial, RmsParams): x, dy and dx hold
    // rows * dim elements, w dim, rstd rows, partial blocks * dim floats (blocks = the grid, so
    // each block writes only its own row); THREADS threads per block.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching rms_norm_bwd", e))?;
    let name = "rms_norm_dweight_f32";
    let f = dev.function(KernelModule::RmsNorm, name)?;
    let cfg = dev.grid_stride_config(KernelModule::RmsNorm, name, THREADS, d.dim, THREADS as usize)?;
    let mut args = dev.stream().launch_builder(&f);
    args.arg(partial.cuda_slice::<f32>("partial")?).arg(dweight.cuda_slice_mut::<f32>("dweight")?).arg(&p);
    // SAFETY: rms_norm_dweight_f32(const float* partial, float* dw, RmsParams): partial holds
    // p.blocks * dim floats, dw dim.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching rms_norm_dweight", e))?;
    Ok(RmsNormGrads { dx, dweight })
}
