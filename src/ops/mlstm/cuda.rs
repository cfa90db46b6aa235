//! Launches of `cuda/mlstm.cu`.

use super::{MlstmDims, MlstmGrads, MlstmInputs, MlstmOutput, MlstmState, NormalizerGrad, MAX_HEAD_DIM};
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::KernelModule;
use crate::tensor::{CudaElement, Tensor};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// Chunk sizes with a compiled kernel (`mlstm_fwd_<dtype>_l<chunk>`).
pub(super) const CHUNKS: [usize; 4] = [16, 32, 64, 128];

/// Mirrors `hk_mlstm::MlstmParams` in cuda/mlstm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct MlstmParams {
    heads: u32,
    len: u32,
    dqk: u32,
    dhv: u32,
    dqk_pad: u32,
    tv: u32,
    has_init: u32,
    eps: f32,
    scale: f32,
}

// SAFETY: seven u32 and two f32 fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for MlstmParams {}

/// Mirrors `hk_mlstm::StepParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct StepParams {
    heads: u32,
    dqk: u32,
    dhv: u32,
    eps: f32,
    scale: f32,
}

// SAFETY: three u32 and two f32 fields, repr(C), no padding.
unsafe impl DeviceRepr for StepParams {}

/// `hk_mlstm::THREADS`, `hk_mlstm::STEP_THREADS`.
const THREADS: u32 = 512;
const STEP_THREADS: u32 = 128;

/// How one forward launch tiles the problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub chunk: usize,
    /// Value columns per block, a multiple of 16.
    pub tv: usize,
    pub dqk_pad: usize,
    pub smem_bytes: usize,
}

fn round16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// The dynamic shared memory of `mlstm_fwd`: the same pieces, in the same order and
/// 128-byte rounding, as its `Carve` takes them.
fn smem_bytes(dtype: DType, chunk: usize, dqk_pad: usize, tv: usize) -> usize {
    let es = dtype.size_in_bytes();
    let skew = 16 / es;
    let f32s = dtype == DType::F32;
    let piece = |bytes: usize| bytes.div_ceil(128) * 128;
    let (ldq, ldv, ldcf, ldct, lds, ldp, ldh) =
        (dqk_pad + skew, tv + skew, tv + 4, tv + skew, chunk + 4, chunk + skew, tv + 4);
    let mut total = piece(chunk * ldq * es) * 2 + piece(chunk * ldv * es) + piece(dqk_pad * ldcf * 4);
    if !f32s {
        total += piece(dqk_pad * ldct * es);
    }
    total += piece(chunk * lds * 4);
    if !f32s {
        total += piece(chunk * ldp * es);
    }
    total += piece(chunk * ldh * 4) + piece(dqk_pad * 4) + piece(chunk * 8) + 5 * piece(chunk * 4) + piece(2 * 8);
    total
}

/// The chunk (32 first, then 64, then 16; or the caller's) and the widest value tile (up to
/// 64 columns) that fit in `max_smem`. 32 was the fastest on an H100 at D128 (1.87 ms
/// against 2.41 ms for 64 and 7.9 ms for 128, B8 NH16 S4096 bf16).
pub(super) fn tiling(dims: &MlstmDims, chunk: Option<usize>, max_smem: usize) -> Result<Tiling> {
    let dqk_pad = round16(dims.dqk);
    let tv_max = round16(dims.dhv).min(64);
    let chunks: Vec<usize> = match chunk {
        Some(c) => vec![c],
        None => vec![32, 64, 16],
    };
    for &c in &chunks {
        let mut tv = tv_max;
        while tv >= 16 {
            let smem_bytes = smem_bytes(dims.dtype, c, dqk_pad, tv);
            if smem_bytes <= max_smem {
                return Ok(Tiling { chunk: c, tv, dqk_pad, smem_bytes });
            }
            tv -= 16;
        }
    }
    Err(Error::invalid(
        "q",
        format!("head dimensions whose chunk of {chunks:?} steps fits in {max_smem} bytes of shared memory"),
        format!("dqk {}, dhv {} in {}", dims.dqk, dims.dhv, dims.dtype),
    ))
}

fn dtype_index(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

fn fwd_name(dtype: DType, chunk: usize) -> Result<&'static str> {
    const NAMES: [[&str; 4]; 3] = [
        ["mlstm_fwd_f32_l16", "mlstm_fwd_f32_l32", "mlstm_fwd_f32_l64", "mlstm_fwd_f32_l128"],
        ["mlstm_fwd_bf16_l16", "mlstm_fwd_bf16_l32", "mlstm_fwd_bf16_l64", "mlstm_fwd_bf16_l128"],
        ["mlstm_fwd_f16_l16", "mlstm_fwd_f16_l32", "mlstm_fwd_f16_l64", "mlstm_fwd_f16_l128"],
    ];
    let c = CHUNKS
        .iter()
        .position(|&c| c == chunk)
        .ok_or_else(|| Error::invalid("chunk", format!("one of {CHUNKS:?}"), chunk.to_string()))?;
    Ok(NAMES[dtype_index(dtype)][c])
}

fn check_gpu_dims(dqk: usize, dhv: usize, heads: usize, len: usize) -> Result<()> {
    if dqk > MAX_HEAD_DIM || dhv > MAX_HEAD_DIM {
        return Err(Error::invalid(
            "q, v",
            format!("head dimensions up to {MAX_HEAD_DIM} on the GPU"),
            format!("dqk {dqk}, dhv {dhv}"),
        ));
    }
    if heads > i32::MAX as usize || len > i32::MAX as usize - 128 {
        return Err(Error::invalid(
            "q",
            "batch * heads below 2^31 and len below 2^31 - 128",
            format!("batch * heads {heads}, len {len}"),
        ));
    }
    Ok(())
}

/// The tiling the forward uses for `inputs` on `dev` (for benches and reports).
pub(super) fn forward_tiling(dev: &CudaDevice, dims: &MlstmDims, chunk: Option<usize>) -> Result<Tiling> {
    tiling(dims, chunk, dev.max_shared_memory_per_block())
}

pub(super) fn forward(dev: &CudaDevice, inputs: &MlstmInputs, dims: &MlstmDims) -> Result<MlstmOutput> {
    let heads = dims.batch * dims.heads;
    check_gpu_dims(dims.dqk, dims.dhv, heads, dims.len)?;
    let tiling = forward_tiling(dev, dims, inputs.chunk)?;
    match dims.dtype {
        DType::F32 => forward_typed::<f32>(dev, inputs, dims, &tiling),
        DType::BF16 => forward_typed::<bf16>(dev, inputs, dims, &tiling),
        DType::F16 => forward_typed::<f16>(dev, inputs, dims, &tiling),
    }
}

fn forward_typed<T: CudaElement>(
    dev: &CudaDevice,
    inputs: &MlstmInputs,
    dims: &MlstmDims,
    tiling: &Tiling,
) -> Result<MlstmOutput> {
    let heads = dims.batch * dims.heads;
    // SAFETY (allocations): for every head, the blocks (one per value tile) write all of h's
    // (len, dhv) values, the final C's (dqk, dhv) values, and the first tile's block the
    // final n and m; with no head nothing is read.
    let mut h = unsafe { Tensor::cuda_uninit(dev, dims.dtype, &dims.h_shape())? };
    let mut c = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[dims.batch, dims.heads, dims.dqk, dims.dhv])? };
    let mut n = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[dims.batch, dims.heads, dims.dqk])? };
    let mut m = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[dims.batch, dims.heads])? };
    if heads > 0 {
        let p = MlstmParams {
            heads: heads as u32,
            len: dims.len as u32,
            dqk: dims.dqk as u32,
            dhv: dims.dhv as u32,
            dqk_pad: tiling.dqk_pad as u32,
            tv: tiling.tv as u32,
            has_init: u32::from(inputs.initial.is_some()),
            eps: inputs.eps,
            scale: 1.0 / (dims.dqk as f32).sqrt(),
        };
        let name = fwd_name(dims.dtype, tiling.chunk)?;
        let f = dev.function(KernelModule::Mlstm, name)?;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            tiling.smem_bytes as i32,
        )
        .map_err(|e| dev.map_err("setting mlstm_fwd's shared memory", e))?;
        let v_tiles = dims.dhv.div_ceil(tiling.tv);
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, v_tiles as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: tiling.smem_bytes as u32,
        };
        let null = 0u64;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(inputs.q.cuda_slice::<T>("q")?)
            .arg(inputs.k.cuda_slice::<T>("k")?)
            .arg(inputs.v.cuda_slice::<T>("v")?)
            .arg(inputs.i.cuda_slice::<f32>("i")?)
            .arg(inputs.f.cuda_slice::<f32>("f")?);
        match inputs.initial {
            Some(s) => {
                args.arg(s.c.cuda_slice::<f32>("initial.c")?)
                    .arg(s.n.cuda_slice::<f32>("initial.n")?)
                    .arg(s.m.cuda_slice::<f32>("initial.m")?);
            }
            None => {
                args.arg(&null).arg(&null).arg(&null);
            }
        }
        args.arg(h.cuda_slice_mut::<T>("h")?)
            .arg(c.cuda_slice_mut::<f32>("final.c")?)
            .arg(n.cuda_slice_mut::<f32>("final.n")?)
            .arg(m.cuda_slice_mut::<f32>("final.m")?)
            .arg(&p);
        // SAFETY: mlstm_fwd_<T>_l<chunk>(q, k, v, i, f, c0, n0, m0, h, c, n, m, MlstmParams):
        // MlstmInputs::dims checked every shape, type and device: q, k hold heads*len*dqk T,
        // v and h heads*len*dhv T, i and f heads*len f32, the states heads*dqk*dhv,
        // heads*dqk and heads f32 (initial ones null with has_init 0). The grid is heads x
        // ceil(dhv / tv) blocks, each reading its head and writing its value columns only;
        // the shared memory is `tiling.smem_bytes`, which the kernel checks against its own
        // carving and which the function was allowed above.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching mlstm_fwd", e))?;
    }
    Ok(MlstmOutput { h, final_state: MlstmState { c, n, m } })
}

pub(super) fn backward(
    _dev: &CudaDevice,
    _inputs: &MlstmInputs,
    _dims: &MlstmDims,
    _dh: &Tensor,
    _dfinal: Option<&MlstmState>,
    _mode: NormalizerGrad,
) -> Result<MlstmGrads> {
    Err(Error::invalid(
        "device",
        "tensors on the CPU: the mLSTM backward has no CUDA kernel yet",
        "tensors on a CUDA device",
    ))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn step(
    dev: &CudaDevice,
    state: &mut MlstmState,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    i: &Tensor,
    f: &Tensor,
    eps: f32,
    dims: &MlstmDims,
) -> Result<Tensor> {
    let heads = dims.batch * dims.heads;
    check_gpu_dims(dims.dqk, dims.dhv, heads, 1)?;
    match dims.dtype {
        DType::F32 => step_typed::<f32>(dev, state, [q, k, v, i, f], eps, dims),
        DType::BF16 => step_typed::<bf16>(dev, state, [q, k, v, i, f], eps, dims),
        DType::F16 => step_typed::<f16>(dev, state, [q, k, v, i, f], eps, dims),
    }
}

fn step_typed<T: CudaElement>(
    dev: &CudaDevice,
    state: &mut MlstmState,
    [q, k, v, i, f]: [&Tensor; 5],
    eps: f32,
    dims: &MlstmDims,
) -> Result<Tensor> {
    let heads = dims.batch * dims.heads;
    // SAFETY (allocation): each head's block writes all dhv values of its h row.
    let mut h = unsafe { Tensor::cuda_uninit(dev, dims.dtype, &[dims.batch, dims.heads, dims.dhv])? };
    if heads == 0 {
        return Ok(h);
    }
    let p = StepParams {
        heads: heads as u32,
        dqk: dims.dqk as u32,
        dhv: dims.dhv as u32,
        eps,
        scale: 1.0 / (dims.dqk as f32).sqrt(),
    };
    let name = ["mlstm_step_f32", "mlstm_step_bf16", "mlstm_step_f16"][dtype_index(dims.dtype)];
    let func = dev.function(KernelModule::Mlstm, name)?;
    let cfg = LaunchConfig {
        grid_dim: (heads as u32, 1, 1),
        block_dim: (STEP_THREADS, 1, 1),
        shared_mem_bytes: ((2 * dims.dqk + STEP_THREADS as usize / 32) * 4) as u32,
    };
    let MlstmState { c, n, m } = state;
    let mut args = dev.stream().launch_builder(&func);
    args.arg(c.cuda_slice_mut::<f32>("state.c")?)
        .arg(n.cuda_slice_mut::<f32>("state.n")?)
        .arg(m.cuda_slice_mut::<f32>("state.m")?)
        .arg(q.cuda_slice::<T>("q")?)
        .arg(k.cuda_slice::<T>("k")?)
        .arg(v.cuda_slice::<T>("v")?)
        .arg(i.cuda_slice::<f32>("i")?)
        .arg(f.cuda_slice::<f32>("f")?)
        .arg(h.cuda_slice_mut::<T>("h")?)
        .arg(&p);
    // SAFETY: mlstm_step_<T>(c, n, m, q, k, v, i, f, h, StepParams): mlstm_step checked the
    // shapes, types and devices: the state holds heads*dqk*dhv, heads*dqk and heads f32,
    // q and k heads*dqk T, v and h heads*dhv T, i and f heads f32. One block per head
    // touches only that head's state; shared memory holds 2*dqk + warps floats (dqk <= 512).
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching mlstm_step", e))?;
    Ok(h)
}
