//! Launches of `cuda/mlstm/`, one file per kernel module as there: the forward (chunked and
//! fused, `forward.rs`), the backward (`backward.rs`, the chunked and fused passes and the
//! gate kernels) and the decode step (`step.rs`); here what they share: the chunked kernels'
//! parameters and tiling, the fused kernels' classes and shared memory.

mod backward;
mod forward;
mod step;

use backward::pass_smem_bytes;
pub(super) use backward::{backward, forward_for_backward};
pub(super) use forward::forward;
pub(super) use step::step;

use super::{MlstmDims, MlstmGrads, MlstmInputs, MlstmOutput, MlstmState, NormalizerGrad, MAX_HEAD_DIM};
use crate::device::{CudaDevice, Device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{kernel_name, KernelModule};
use crate::ops::push_opt;
use crate::tensor::{CudaElement, Tensor};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// Chunk sizes with a compiled kernel (`mlstm_fwd_<dtype>_l<chunk>`).
pub(super) const CHUNKS: [usize; 4] = [16, 32, 64, 128];

/// Mirrors `hk_mlstm::MlstmParams` in cuda/mlstm/mlstm.cuh.
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
crate::kernels::assert_kernel_params!(MlstmParams, 9);

// SAFETY: seven u32 and two f32 fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for MlstmParams {}

/// `hk_mlstm::THREADS`.
const THREADS: u32 = 512;

/// How one forward launch tiles the problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub chunk: usize,
    /// Value columns per block, a multiple of 16.
    pub tv: usize,
    pub dqk_pad: usize,
    pub smem_bytes: usize,
    /// The fused tensor-core forward (`mlstm_fwd_fused_*`, bf16 / f16) rather than the
    /// chunked one; then `dqk_pad` is its head-dimension class (64, 128 or 256).
    pub fused: bool,
}

fn round16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// The dynamic shared memory of `mlstm_fwd`: the same pieces, in the same order and
/// 128-byte rounding, as its `Carve` takes them, which are `mlstm_pass`'s (Q, K, V as X, Y,
/// Z; H as O) plus the f32 normaliser n.
fn smem_bytes(dtype: DType, chunk: usize, dqk_pad: usize, tv: usize) -> usize {
    pass_smem_bytes(dtype, chunk, dqk_pad, tv) + (dqk_pad * 4).div_ceil(128) * 128
}

/// The chunk (`chunk`, or 32, then 64, then 16) and the widest tile of `cols` columns (up to
/// 64, a multiple of 16) whose kernel needs at most `max_smem` bytes by `smem(chunk, tile)`:
/// `(chunk, tile, smem)`, or None.
fn fit_chunk_and_tile(
    chunk: Option<usize>,
    cols: usize,
    max_smem: usize,
    smem: impl Fn(usize, usize) -> usize,
) -> Option<(usize, usize, usize)> {
    for c in chunks_tried(chunk) {
        let mut tile = round16(cols).min(64);
        while tile >= 16 {
            let bytes = smem(c, tile);
            if bytes <= max_smem {
                return Some((c, tile, bytes));
            }
            tile -= 16;
        }
    }
    None
}

/// The chunks `fit_chunk_and_tile` tries, in order.
fn chunks_tried(chunk: Option<usize>) -> Vec<usize> {
    chunk.map_or_else(|| vec![32, 64, 16], |c| vec![c])
}

/// The chunk (32 first, then 64, then 16; or the caller's) and the widest value tile (up to
/// 64 columns) that fit in `max_smem`. 32 was the fastest on an H100 at D128 (1.87 ms
/// against 2.41 ms for 64 and 7.9 ms for 128, B8 NH16 S4096 bf16).
pub(super) fn tiling(dims: &MlstmDims, chunk: Option<usize>, max_smem: usize) -> Result<Tiling> {
    let dqk_pad = round16(dims.dqk);
    match fit_chunk_and_tile(chunk, dims.dhv, max_smem, |c, tv| smem_bytes(dims.dtype, c, dqk_pad, tv)) {
        Some((chunk, tv, smem_bytes)) => Ok(Tiling { chunk, tv, dqk_pad, smem_bytes, fused: false }),
        None => Err(Error::invalid(
            "q",
            format!(
                "head dimensions whose chunk of {:?} steps fits in {max_smem} bytes of shared memory",
                chunks_tried(chunk)
            ),
            format!("dqk {}, dhv {} in {}", dims.dqk, dims.dhv, dims.dtype),
        )),
    }
}

/// The chunked kernel `mlstm_<variant>_<dtype>_l<chunk>` (variant `fwd` or `pass`), for a
/// chunk of [`CHUNKS`].
fn chunk_kernel_name(variant: &str, dtype: DType, chunk: usize) -> Result<String> {
    if !CHUNKS.contains(&chunk) {
        return Err(Error::invalid("chunk", format!("one of {CHUNKS:?}"), chunk.to_string()));
    }
    Ok(kernel_name("mlstm", variant, dtype, &format!("_l{chunk}")))
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

/// The tiling the forward uses for `inputs` on `dev` (for benches and reports): the fused
/// forward where it applies, else the chunked one.
pub(super) fn forward_tiling(dev: &CudaDevice, dims: &MlstmDims, chunk: Option<usize>) -> Result<Tiling> {
    let max_smem = dev.max_shared_memory_per_block();
    match fused_dqk_class(dims, chunk, max_smem) {
        Some(dqk_pad) => {
            Ok(Tiling { chunk: FUSED_CHUNK, tv: FUSED_TV, dqk_pad, smem_bytes: fused_smem_bytes(dqk_pad), fused: true })
        }
        None => tiling(dims, chunk, max_smem),
    }
}

/// Mirrors `hk_mlstm::FusedParams` in cuda/mlstm/mlstm.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FusedParams {
    heads: u32,
    len: u32,
    dqk: u32,
    dhv: u32,
    has_init: u32,
    vec_in: u32,
    vec_out: u32,
    eps: f32,
    scale: f32,
}
crate::kernels::assert_kernel_params!(FusedParams, 9);

// SAFETY: seven u32 and two f32 fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for FusedParams {}

/// The fused forward's steps per chunk (`hk_mlstm::fused::L`) and its head-dimension classes:
/// `mlstm_fwd_fused_<dtype>_k<class>` takes dqk up to the class.
const FUSED_CHUNK: usize = 64;
const FUSED_DQK: [usize; 3] = [64, 128, 256];

/// `hk_mlstm::fused::TV`: value columns per block.
const FUSED_TV: usize = 64;

/// `hk_mlstm::fused::Cfg<class>::THREADS`: 4 output warps and one state warp per 32 rows of C.
fn fused_threads(dqk_class: usize) -> usize {
    32 * (4 + dqk_class / 32)
}

/// `hk_mlstm::fused::Cfg<class>::SMEM`: Q and K twice (64 rows of class + 8), V twice (64
/// rows of TV + 8), C (class rows of TV + 8), all 2-byte elements, then two `GateTile`s (five
/// f32 per step and four more).
fn fused_smem_bytes(dqk_class: usize) -> usize {
    let (l, vx, ldq) = (FUSED_CHUNK, FUSED_TV + 8, dqk_class + 8);
    (4 * l * ldq + 2 * l * vx + dqk_class * vx) * 2 + 2 * (5 * l + 4) * 4
}

/// The fused forward's head-dimension class for `dims`, when it takes them: bf16 / f16, dqk
/// up to 256, chunk unset or 64, and its shared memory within `max_smem`.
fn fused_dqk_class(dims: &MlstmDims, chunk: Option<usize>, max_smem: usize) -> Option<usize> {
    if dims.dtype == DType::F32 || !matches!(chunk, None | Some(FUSED_CHUNK)) {
        return None;
    }
    let class = *FUSED_DQK.iter().find(|&&c| dims.dqk <= c)?;
    (fused_smem_bytes(class) <= max_smem).then_some(class)
}
