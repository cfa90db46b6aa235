//! Launches of `cuda/adamw.cu`.

use super::{AdamWConfig, AdamWParam, AdamWStep, ParamGroup};
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::KernelModule;
use crate::tensor::Tensor;
use cudarc::driver::{DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop};

/// Mirrors `hk_adamw::TensorDesc`: device pointers, count, group, copy type (56 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct TensorDesc {
    param: u64,
    grad: u64,
    m: u64,
    v: u64,
    copy: u64,
    n: u64,
    group: u32,
    copy_type: u32,
}
const _: () = assert!(std::mem::size_of::<TensorDesc>() == 56 && std::mem::align_of::<TensorDesc>() == 8);

/// Mirrors `hk_adamw::AdamParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AdamParams {
    tensors: u32,
    chunks: u32,
    flags: u32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    step_size_scale: f32,
    inv_sqrt_bc2: f32,
    max_norm: f32,
    pad: u32,
}
crate::kernels::assert_kernel_params!(AdamParams, 10);

// SAFETY: ten 4-byte fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for AdamParams {}

/// `hk_adamw::CHUNK` and `THREADS`.
const CHUNK: usize = 4096;
const THREADS: u32 = 256;
const ZERO_GRAD: u32 = 1;
const CLIP: u32 = 2;

/// The device address of an f32 tensor, with the guard that records its use on the stream.
fn ptr_f32<'a>(dev: &'a CudaDevice, t: &'a mut Tensor, arg: &'static str) -> Result<(u64, SyncOnDrop<'a>)> {
    Ok(t.cuda_slice_mut::<f32>(arg)?.device_ptr_mut(dev.stream()))
}

fn ptr_any<'a>(dev: &'a CudaDevice, t: &'a mut Tensor) -> Result<(u64, u32, SyncOnDrop<'a>)> {
    Ok(match t.dtype() {
        DType::F32 => {
            let (p, g) = t.cuda_slice_mut::<f32>("copy")?.device_ptr_mut(dev.stream());
            (p, 1, g)
        }
        DType::BF16 => {
            let (p, g) = t.cuda_slice_mut::<half::bf16>("copy")?.device_ptr_mut(dev.stream());
            (p, 2, g)
        }
        DType::F16 => {
            let (p, g) = t.cuda_slice_mut::<half::f16>("copy")?.device_ptr_mut(dev.stream());
            (p, 3, g)
        }
    })
}

pub(super) fn step(
    dev: &CudaDevice,
    c: &AdamWConfig,
    step: u64,
    groups: &[ParamGroup],
    params: &mut [AdamWParam],
) -> Result<AdamWStep> {
    let s = dev.stream();
    let tensors = params.len() as u32;
    // Chunks per tensor and their prefix (chunk_start has one more entry: the total).
    let mut chunk_start = Vec::with_capacity(params.len() + 1);
    let mut total: u64 = 0;
    for p in params.iter() {
        chunk_start.push(total);
        total += p.param.elem_count().div_ceil(CHUNK) as u64;
    }
    chunk_start.push(total);
    if total > u32::MAX as u64 || params.len() > u32::MAX as usize {
        return Err(Error::invalid("params", "fewer than 2^32 chunks of 4096 elements", total.to_string()));
    }
    let chunk_start: Vec<u32> = chunk_start.into_iter().map(|c| c as u32).collect();
    let chunks = total as u32;
    let clip = c.max_grad_norm.is_some();
    // SAFETY (allocations): adamw_grad_sq writes every chunk's partial sum; adamw_norm_reduce
    // the norm.
    let mut norm = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[1])? };
    let map = |what: &'static str, bytes: usize| move |e| dev.map_err_bytes(what, e, bytes);
    let mut partial = unsafe { s.alloc::<f32>((chunks as usize).max(1)) }
        .map_err(map("allocating the gradient-norm partials", 4 * chunks as usize))?;

    let mut guards = Vec::with_capacity(5 * params.len());
    let mut descs = Vec::with_capacity(params.len());
    for p in params.iter_mut() {
        let n = p.param.elem_count() as u64;
        let (param, g0) = ptr_f32(dev, p.param, "param")?;
        let (grad, g1) = ptr_f32(dev, p.grad, "grad")?;
        let (m, g2) = ptr_f32(dev, p.m, "m")?;
        let (v, g3) = ptr_f32(dev, p.v, "v")?;
        guards.extend([g0, g1, g2, g3]);
        let (copy, copy_type) = match p.copy.as_deref_mut() {
            Some(t) => {
                let (ptr, ty, g) = ptr_any(dev, t)?;
                guards.push(g);
                (ptr, ty)
            }
            None => (0, 0),
        };
        descs.push(TensorDesc { param, grad, m, v, copy, n, group: p.group as u32, copy_type });
    }
    let desc_bytes: &[u8] = bytemuck::cast_slice(&descs);
    let descs_dev = s.clone_htod(desc_bytes).map_err(map("copying the AdamW tensor table", desc_bytes.len()))?;
    let starts_dev = s.clone_htod(&chunk_start).map_err(map("copying the AdamW chunk table", 4 * chunk_start.len()))?;
    let group_table: Vec<f32> = groups.iter().flat_map(|g| [g.lr, g.weight_decay]).collect();
    let groups_dev = s.clone_htod(&group_table).map_err(map("copying the AdamW groups", 4 * group_table.len()))?;

    let bc1 = 1.0 - f64::from(c.beta1).powf(step as f64);
    let bc2 = 1.0 - f64::from(c.beta2).powf(step as f64);
    let p = AdamParams {
        tensors,
        chunks,
        flags: if c.zero_grad { ZERO_GRAD } else { 0 } | if clip { CLIP } else { 0 },
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        step_size_scale: (1.0 / bc1) as f32,
        inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
        max_norm: c.max_grad_norm.unwrap_or(0.0),
        pad: 0,
    };
    if chunks == 0 {
        return Ok(AdamWStep { grad_norm: None });
    }
    if clip {
        let name = "adamw_grad_sq";
        let f = dev.function(KernelModule::Adamw, name)?;
        let cfg = dev.grid_stride_config(KernelModule::Adamw, name, THREADS, chunks as usize, 1)?;
        let mut args = s.launch_builder(&f);
        args.arg(&descs_dev).arg(&starts_dev).arg(&mut partial).arg(&p);
        // SAFETY: adamw_grad_sq(const TensorDesc*, const u32* chunk_start, float* partial,
        // AdamParams): descs_dev holds p.tensors descriptors whose pointers are live f32
        // buffers of n elements each (their guards are held until the launches are queued),
        // chunk_start p.tensors + 1 increasing entries ending at p.chunks, partial p.chunks.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching adamw_grad_sq", e))?;
        let f = dev.function(KernelModule::Adamw, "adamw_norm_reduce")?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        let mut args = s.launch_builder(&f);
        args.arg(&partial).arg(norm.cuda_slice_mut::<f32>("norm")?).arg(&chunks);
        // SAFETY: adamw_norm_reduce(const float* partial, float* norm, u32 chunks): partial holds
        // `chunks` floats written above, norm one; 1024 threads as its tree needs.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching adamw_norm_reduce", e))?;
    }
    let name = "adamw_update";
    let f = dev.function(KernelModule::Adamw, name)?;
    let cfg = dev.grid_stride_config(KernelModule::Adamw, name, THREADS, chunks as usize, 1)?;
    let mut args = s.launch_builder(&f);
    args.arg(&descs_dev).arg(&starts_dev).arg(&groups_dev).arg(norm.cuda_slice::<f32>("norm")?).arg(&p);
    // SAFETY: adamw_update(descs, chunk_start, const float2* groups, const float* norm,
    // AdamParams): as above, plus groups holding one (lr, wd) pair per group (every descriptor's
    // group is below their count, checked in `check_params`) and norm one float, read only with
    // CLIP (written by the reduction before it). Each element is read and written by one thread;
    // the tensors are distinct allocations (each borrowed mutably once), so nothing aliases.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching adamw_update", e))?;
    drop(guards);
    Ok(AdamWStep { grad_norm: clip.then_some(norm) })
}
