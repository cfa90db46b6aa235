//! Launches of `cuda/elementwise.cu`.

use super::{Activation, GatedGrads};
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::Result;
use crate::kernels::{kernel_name, KernelModule};
use crate::tensor::{CudaElement, Tensor};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// Mirrors `hk_ew::EwParams` in cuda/elementwise.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct EwParams {
    n_lo: u32,
    n_hi: u32,
    act: u32,
    pad: u32,
}
crate::kernels::assert_kernel_params!(EwParams, 4);

// SAFETY: four 4-byte fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for EwParams {}

/// `hk_ew::THREADS`.
const THREADS: u32 = 256;

fn params(n: usize, act: Activation) -> EwParams {
    let n = n as u64;
    EwParams { n_lo: n as u32, n_hi: (n >> 32) as u32, act: act.code(), pad: 0 }
}

/// A one-wave grid-stride launch over the 16-byte vectors of `n` elements of `src`'s type.
fn config(dev: &CudaDevice, name: &str, n: usize, src: DType) -> Result<LaunchConfig> {
    let per_vec = 16 / src.size_in_bytes();
    dev.grid_stride_config(KernelModule::Elementwise, name, THREADS, n.div_ceil(per_vec), THREADS as usize)
}

macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
        }
    };
}

pub(super) fn activation(dev: &CudaDevice, x: &Tensor, act: Activation) -> Result<Tensor> {
    by_dtype!(x.dtype(), activation_typed(dev, x, act))
}

fn activation_typed<T: CudaElement>(dev: &CudaDevice, x: &Tensor, act: Activation) -> Result<Tensor> {
    // SAFETY (allocation): the kernel writes every element of y.
    let mut y = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, x.shape())? };
    let n = x.elem_count();
    if n == 0 {
        return Ok(y);
    }
    let name = kernel_name("elementwise", "act", T::DTYPE, "");
    let f = dev.function(KernelModule::Elementwise, &name)?;
    let cfg = config(dev, &name, n, T::DTYPE)?;
    let p = params(n, act);
    let mut args = dev.stream().launch_builder(&f);
    args.arg(x.cuda_slice::<T>("x")?).arg(y.cuda_slice_mut::<T>("y")?).arg(&p);
    // SAFETY: elementwise_act_<T>(const T* x, T* y, EwParams): both hold n = p.n elements, from
    // 256-byte aligned allocations (the 16-byte vector accesses).
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching elementwise_act", e))?;
    Ok(y)
}

pub(super) fn activation_backward(dev: &CudaDevice, x: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor> {
    by_dtype!(x.dtype(), activation_backward_typed(dev, x, dy, act))
}

fn activation_backward_typed<T: CudaElement>(
    dev: &CudaDevice,
    x: &Tensor,
    dy: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    // SAFETY (allocation): the kernel writes every element of dx.
    let mut dx = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, x.shape())? };
    let n = x.elem_count();
    if n == 0 {
        return Ok(dx);
    }
    let name = kernel_name("elementwise", "actbwd", T::DTYPE, "");
    let f = dev.function(KernelModule::Elementwise, &name)?;
    let cfg = config(dev, &name, n, T::DTYPE)?;
    let p = params(n, act);
    let mut args = dev.stream().launch_builder(&f);
    args.arg(x.cuda_slice::<T>("x")?).arg(dy.cuda_slice::<T>("dy")?).arg(dx.cuda_slice_mut::<T>("dx")?).arg(&p);
    // SAFETY: elementwise_actbwd_<T>(const T* x, const T* dy, T* dx, EwParams): all three hold
    // n elements (dy's shape checked against x's), from aligned allocations.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching elementwise_actbwd", e))?;
    Ok(dx)
}

pub(super) fn gated(dev: &CudaDevice, gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    by_dtype!(gate.dtype(), gated_typed(dev, gate, up, act))
}

fn gated_typed<T: CudaElement>(dev: &CudaDevice, gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    // SAFETY (allocation): the kernel writes every element of y.
    let mut y = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, gate.shape())? };
    let n = gate.elem_count();
    if n == 0 {
        return Ok(y);
    }
    let name = kernel_name("elementwise", "gated", T::DTYPE, "");
    let f = dev.function(KernelModule::Elementwise, &name)?;
    let cfg = config(dev, &name, n, T::DTYPE)?;
    let p = params(n, act);
    let mut args = dev.stream().launch_builder(&f);
    args.arg(gate.cuda_slice::<T>("gate")?).arg(up.cuda_slice::<T>("up")?).arg(y.cuda_slice_mut::<T>("y")?).arg(&p);
    // SAFETY: elementwise_gated_<T>(const T* gate, const T* up, T* y, EwParams): all three hold
    // n elements (up's shape checked against gate's), from aligned allocations.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching elementwise_gated", e))?;
    Ok(y)
}

pub(super) fn gated_backward(
    dev: &CudaDevice,
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
    act: Activation,
) -> Result<GatedGrads> {
    by_dtype!(gate.dtype(), gated_backward_typed(dev, gate, up, dy, act))
}

fn gated_backward_typed<T: CudaElement>(
    dev: &CudaDevice,
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
    act: Activation,
) -> Result<GatedGrads> {
    // SAFETY (allocations): the kernel writes every element of dgate and dup.
    let mut dgate = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, gate.shape())? };
    let mut dup = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, gate.shape())? };
    let n = gate.elem_count();
    if n == 0 {
        return Ok(GatedGrads { dgate, dup });
    }
    let name = kernel_name("elementwise", "gatedbwd", T::DTYPE, "");
    let f = dev.function(KernelModule::Elementwise, &name)?;
    let cfg = config(dev, &name, n, T::DTYPE)?;
    let p = params(n, act);
    let mut args = dev.stream().launch_builder(&f);
    args.arg(gate.cuda_slice::<T>("gate")?)
        .arg(up.cuda_slice::<T>("up")?)
        .arg(dy.cuda_slice::<T>("dy")?)
        .arg(dgate.cuda_slice_mut::<T>("dgate")?)
        .arg(dup.cuda_slice_mut::<T>("dup")?)
        .arg(&p);
    // SAFETY: elementwise_gatedbwd_<T>(gate, up, dy, dgate, dup, EwParams): all five hold n
    // elements (shapes checked against gate's), from aligned allocations.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching elementwise_gatedbwd", e))?;
    Ok(GatedGrads { dgate, dup })
}

pub(super) fn add_into(dev: &CudaDevice, dst: &mut Tensor, src: &Tensor) -> Result<()> {
    match (dst.dtype(), src.dtype()) {
        (DType::F32, DType::BF16) => add_typed::<f32, bf16>(dev, dst, src, "elementwise_add_f32_from_bf16"),
        (DType::F32, DType::F16) => add_typed::<f32, f16>(dev, dst, src, "elementwise_add_f32_from_f16"),
        (DType::F32, _) => add_typed::<f32, f32>(dev, dst, src, "elementwise_add_f32"),
        (DType::BF16, _) => add_typed::<bf16, bf16>(dev, dst, src, "elementwise_add_bf16"),
        (DType::F16, _) => add_typed::<f16, f16>(dev, dst, src, "elementwise_add_f16"),
    }
}

fn add_typed<D: CudaElement, S: CudaElement>(
    dev: &CudaDevice,
    dst: &mut Tensor,
    src: &Tensor,
    name: &str,
) -> Result<()> {
    let n = src.elem_count();
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(KernelModule::Elementwise, name)?;
    let cfg = config(dev, name, n, S::DTYPE)?;
    let p = params(n, Activation::Silu);
    let mut args = dev.stream().launch_builder(&f);
    args.arg(dst.cuda_slice_mut::<D>("dst")?).arg(src.cuda_slice::<S>("src")?).arg(&p);
    // SAFETY: elementwise_add_<D>[_from_<S>](D* dst, const S* src, EwParams): both hold n
    // elements (src's shape checked against dst's; the caller matched the types to the
    // kernel), from aligned allocations; dst and src are distinct tensors (one is borrowed
    // mutably), so they do not alias.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching elementwise_add", e))?;
    Ok(())
}
