//! Launches of `cuda/spline_activation.cu`.

use super::{ActivationGrads, SplineActivation};
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{kernel_name, KernelModule};
use crate::tensor::{CudaElement, Tensor};
use cudarc::driver::{DeviceRepr, PushKernelArg};
use half::{bf16, f16};

/// Mirrors `hk_act::ActParams` in cuda/spline_activation.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ActParams {
    n_rows: u32,
    channels: u32,
    n_knots: u32,
    order: u32,
    has_base: u32,
    rows_per_chunk: u32,
    uniform: u32,
    shared_acc: u32,
}
crate::kernels::assert_kernel_params!(ActParams, 8);

// SAFETY: eight u32 fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for ActParams {}

const BLOCK_THREADS: u32 = 256;
/// Rows summed per chunk by the parameter-gradient partial kernel.
const ROWS_PER_CHUNK: usize = 64;
/// The partial kernel keeps its sums in shared memory up to this size per block (the
/// default dynamic shared-memory limit), i.e. for nb + 1 <= 48 at 256 threads.
const MAX_SHARED_ACC_BYTES: usize = 48 * 1024;

#[derive(Clone, Copy)]
enum Kernel {
    Forward,
    Dx,
    Partials,
    Reduce,
}

/// `spline_activation_<kernel>_<dtype>`.
fn name(k: Kernel, d: DType) -> String {
    let variant = match k {
        Kernel::Forward => "forward",
        Kernel::Dx => "dx",
        Kernel::Partials => "param_partials",
        Kernel::Reduce => "param_reduce",
    };
    kernel_name("spline_activation", variant, d, "")
}

fn params(act: &SplineActivation, rows: usize) -> Result<ActParams> {
    let c = act.channels();
    if rows.checked_mul(c).is_none_or(|n| n > u32::MAX as usize) {
        return Err(Error::invalid("x", "fewer than 2^32 elements", format!("{rows} x {c}")));
    }
    Ok(ActParams {
        n_rows: rows as u32,
        channels: c as u32,
        n_knots: act.grid().n_knots() as u32,
        order: act.grid().order() as u32,
        has_base: u32::from(act.base_weight().is_some()),
        rows_per_chunk: ROWS_PER_CHUNK as u32,
        uniform: u32::from(act.grid().is_uniform()),
        shared_acc: 0,
    })
}

pub(super) fn forward(act: &SplineActivation, dev: &CudaDevice, x: &Tensor, rows: usize) -> Result<Tensor> {
    match act.dtype() {
        DType::F32 => forward_typed::<f32>(act, dev, x, rows),
        DType::BF16 => forward_typed::<bf16>(act, dev, x, rows),
        DType::F16 => forward_typed::<f16>(act, dev, x, rows),
    }
}

pub(super) fn backward(
    act: &SplineActivation,
    dev: &CudaDevice,
    x: &Tensor,
    dy: &Tensor,
    rows: usize,
) -> Result<ActivationGrads> {
    match act.dtype() {
        DType::F32 => backward_typed::<f32>(act, dev, x, dy, rows),
        DType::BF16 => backward_typed::<bf16>(act, dev, x, dy, rows),
        DType::F16 => backward_typed::<f16>(act, dev, x, dy, rows),
    }
}

fn forward_typed<T: CudaElement>(act: &SplineActivation, dev: &CudaDevice, x: &Tensor, rows: usize) -> Result<Tensor> {
    let p = params(act, rows)?;
    // SAFETY (allocation): spline_activation_forward writes every element of y.
    let mut y = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, x.shape())? };
    let n = rows * act.channels();
    if n == 0 {
        return Ok(y);
    }
    let kernel = name(Kernel::Forward, T::DTYPE);
    let f = dev.function(KernelModule::SplineActivation, &kernel)?;
    let cfg =
        dev.grid_stride_config(KernelModule::SplineActivation, &kernel, BLOCK_THREADS, n, BLOCK_THREADS as usize)?;
    let coeff = act.coeff().cuda_slice::<T>("coeff")?;
    // Without a base weight the kernel never reads `w`; coeff stands in for it.
    let w = match act.base_weight() {
        Some(t) => t.cuda_slice::<T>("base_weight")?,
        None => coeff,
    };
    let mut args = dev.stream().launch_builder(&f);
    args.arg(x.cuda_slice::<T>("x")?)
        .arg(act.grid().knots().cuda_slice::<f32>("grid")?)
        .arg(coeff)
        .arg(w)
        .arg(y.cuda_slice_mut::<T>("y")?)
        .arg(&p);
    // SAFETY: spline_activation_forward_<T>(const T* x, const float* grid, const T* coeff,
    // const T* w, T* y, ActParams): x and y hold n_rows * C elements, grid C * n_knots (order
    // <= 7), coeff C * nb, w C (read only when has_base); indices stay inside these.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching spline_activation_forward", e))?;
    Ok(y)
}

fn backward_typed<T: CudaElement>(
    act: &SplineActivation,
    dev: &CudaDevice,
    x: &Tensor,
    dy: &Tensor,
    rows: usize,
) -> Result<ActivationGrads> {
    let p = params(act, rows)?;
    let (c, nb) = (act.channels(), act.grid().n_bases());
    let dtype = T::DTYPE;
    // SAFETY (allocations): dx by spline_activation_dx, d_coeff and d_w by
    // spline_activation_param_reduce (every element; d_w only when there is a base weight).
    let mut dx = unsafe { Tensor::cuda_uninit(dev, dtype, x.shape())? };
    let mut d_coeff = unsafe { Tensor::cuda_uninit(dev, dtype, &[c, nb])? };
    let mut d_w = match act.base_weight() {
        Some(_) => Some(unsafe { Tensor::cuda_uninit(dev, dtype, &[c])? }),
        None => None,
    };
    let coeff = act.coeff().cuda_slice::<T>("coeff")?;
    let w = match act.base_weight() {
        Some(t) => t.cuda_slice::<T>("base_weight")?,
        None => coeff,
    };
    let knots = act.grid().knots().cuda_slice::<f32>("grid")?;
    let xs = x.cuda_slice::<T>("x")?;
    let dys = dy.cuda_slice::<T>("dy")?;
    let n = rows * c;
    if n > 0 {
        let kernel = name(Kernel::Dx, dtype);
        let f = dev.function(KernelModule::SplineActivation, &kernel)?;
        let cfg =
            dev.grid_stride_config(KernelModule::SplineActivation, &kernel, BLOCK_THREADS, n, BLOCK_THREADS as usize)?;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(xs).arg(knots).arg(coeff).arg(w).arg(dys).arg(dx.cuda_slice_mut::<T>("dx")?).arg(&p);
        // SAFETY: spline_activation_dx_<T>(x, grid, coeff, w, dy, dx, ActParams): x, dy and dx
        // hold n_rows * C elements; grid, coeff and w as for the forward.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching spline_activation_dx", e))?;
    }
    // Parameter gradients: per-chunk partial sums in f32, then a fixed-order reduction.
    let n_chunks = rows.div_ceil(ROWS_PER_CHUNK).max(1);
    // SAFETY (allocation): the partials kernel writes every (chunk, channel, 0..=nb) entry
    // (it zeroes each before summing), also for chunks with no rows.
    let mut partial = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[n_chunks, c, nb + 1])? };
    let nc32 = n_chunks as u32;
    {
        let kernel = name(Kernel::Partials, dtype);
        let f = dev.function(KernelModule::SplineActivation, &kernel)?;
        let mut cfg = dev.grid_stride_config(
            KernelModule::SplineActivation,
            &kernel,
            BLOCK_THREADS,
            n_chunks * c,
            BLOCK_THREADS as usize,
        )?;
        let acc_bytes = (nb + 1) * BLOCK_THREADS as usize * std::mem::size_of::<f32>();
        let mut pp = p;
        if acc_bytes <= MAX_SHARED_ACC_BYTES {
            cfg.shared_mem_bytes = acc_bytes as u32;
            pp.shared_acc = 1;
        }
        let mut args = dev.stream().launch_builder(&f);
        args.arg(xs).arg(knots).arg(dys).arg(partial.cuda_slice_mut::<f32>("partial")?).arg(&pp).arg(&nc32);
        // SAFETY: spline_activation_param_partials_<T>(x, grid, dy, float* partial, ActParams,
        // uint32_t n_chunks): partial holds n_chunks * C * (nb + 1) floats; rows read are
        // below n_rows (chunk bounds clamp to it); with shared_acc the block has
        // (nb + 1) * BLOCK_THREADS floats of dynamic shared memory, the kernel's need.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching spline_activation_param_partials", e))?;
    }
    {
        let kernel = name(Kernel::Reduce, dtype);
        let f = dev.function(KernelModule::SplineActivation, &kernel)?;
        let cfg = dev.grid_stride_config(
            KernelModule::SplineActivation,
            &kernel,
            BLOCK_THREADS,
            c * (nb + 1),
            BLOCK_THREADS as usize,
        )?;
        let (c32, nb32, has_base) = (c as u32, nb as u32, p.has_base);
        let mut args = dev.stream().launch_builder(&f);
        args.arg(partial.cuda_slice::<f32>("partial")?).arg(d_coeff.cuda_slice_mut::<T>("d_coeff")?);
        match d_w.as_mut() {
            Some(t) => args.arg(t.cuda_slice_mut::<T>("d_w")?),
            None => args.arg(coeff), // never written: has_base = 0
        };
        args.arg(&nc32).arg(&c32).arg(&nb32).arg(&has_base);
        // SAFETY: spline_activation_param_reduce_<T>(const float* partial, T* d_coeff, T* d_w,
        // n_chunks, C, nb, has_base): partial holds n_chunks * C * (nb + 1) floats, d_coeff
        // C * nb, d_w C and is written only when has_base (else the stand-in is untouched).
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching spline_activation_param_reduce", e))?;
    }
    Ok(ActivationGrads { dx, coeff: d_coeff, base_weight: d_w })
}
