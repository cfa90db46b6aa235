//! Launches of `cuda/embedding.cu`.

use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{kernel_name, KernelModule};
use crate::tensor::{CudaElement, Tensor};
use crate::tokens::{GroupsCache, TokenIds};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// Mirrors `hk_emb::EmbParams` in cuda/embedding.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct EmbParams {
    rows: u32,
    dim: u32,
}
crate::kernels::assert_kernel_params!(EmbParams, 2);

// SAFETY: two 4-byte fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for EmbParams {}

/// Elements per access (16 bytes of `dtype`, or 1 when dim is not a multiple), and the launch:
/// a thread per vector of a row along x (blocks of up to 256), rows along y (grid-stride).
fn config(dtype: DType, dim: usize, rows: usize) -> (usize, LaunchConfig) {
    let full = 16 / dtype.size_in_bytes();
    let vec = if dim % full == 0 { full } else { 1 };
    let nvec = dim / vec;
    let threads = nvec.next_multiple_of(32).clamp(32, 256);
    let cfg = LaunchConfig {
        grid_dim: (nvec.div_ceil(threads).max(1) as u32, rows.clamp(1, 65535) as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    (vec, cfg)
}

pub(super) fn forward(dev: &CudaDevice, table: &Tensor, ids: &TokenIds, dim: usize, shape: &[usize]) -> Result<Tensor> {
    match table.dtype() {
        DType::F32 => forward_typed::<f32>(dev, table, ids, dim, shape),
        DType::BF16 => forward_typed::<bf16>(dev, table, ids, dim, shape),
        DType::F16 => forward_typed::<f16>(dev, table, ids, dim, shape),
    }
}

fn forward_typed<T: CudaElement>(
    dev: &CudaDevice,
    table: &Tensor,
    ids: &TokenIds,
    dim: usize,
    shape: &[usize],
) -> Result<Tensor> {
    // SAFETY (allocation): the kernel writes every vector of every row.
    let mut out = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, shape)? };
    if ids.is_empty() || dim == 0 {
        return Ok(out);
    }
    let (vec, cfg) = config(T::DTYPE, dim, ids.len());
    let name = kernel_name("embedding", "fwd", T::DTYPE, &format!("_v{vec}"));
    let f = dev.function(KernelModule::Embedding, &name)?;
    let p = EmbParams { rows: ids.len() as u32, dim: dim as u32 };
    let mut args = dev.stream().launch_builder(&f);
    args.arg(table.cuda_slice::<T>("table")?).arg(ids.cuda_slice("ids")?).arg(out.cuda_slice_mut::<T>("out")?).arg(&p);
    // SAFETY: embedding_fwd_<T>_v<vec>(const T* table, const int* ids, T* out, EmbParams): ids
    // holds `rows` ids, each in 0..vocab (checked on the host), table vocab * dim elements, out
    // rows * dim; dim is a multiple of vec and the buffers are 256-byte aligned.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching embedding_fwd", e))?;
    Ok(out)
}

pub(super) fn backward(
    dev: &CudaDevice,
    dtable: &mut Tensor,
    groups: &GroupsCache,
    dout: &Tensor,
    dim: usize,
) -> Result<()> {
    match dout.dtype() {
        DType::F32 => backward_typed::<f32>(dev, dtable, groups, dout, dim),
        DType::BF16 => backward_typed::<bf16>(dev, dtable, groups, dout, dim),
        DType::F16 => backward_typed::<f16>(dev, dtable, groups, dout, dim),
    }
}

fn backward_typed<T: CudaElement>(
    dev: &CudaDevice,
    dtable: &mut Tensor,
    groups: &GroupsCache,
    dout: &Tensor,
    dim: usize,
) -> Result<()> {
    let distinct = groups.groups.ids.len();
    if distinct == 0 || dim == 0 {
        return Ok(());
    }
    let Some(packed) = &groups.packed else {
        return Err(Error::DeviceMismatch { arg: "ids", expected: "a CUDA device".into(), found: "cpu".into() });
    };
    let (vec, cfg) = config(T::DTYPE, dim, distinct);
    let name = kernel_name("embedding", "bwd", T::DTYPE, &format!("_v{vec}"));
    let f = dev.function(KernelModule::Embedding, &name)?;
    let p = EmbParams { rows: distinct as u32, dim: dim as u32 };
    let mut args = dev.stream().launch_builder(&f);
    args.arg(dout.cuda_slice::<T>("dout")?).arg(packed).arg(dtable.cuda_slice_mut::<f32>("dtable")?).arg(&p);
    // SAFETY: embedding_bwd_<T>_v<vec>(const T* dout, const int* groups, float* dtable,
    // EmbParams): packed holds `rows` distinct ids (each in 0..vocab, checked before), rows + 1
    // offsets into the token list and the token list (indices below dout's rows), as
    // `group_by_id` built them; dout holds tokens * dim elements, dtable vocab * dim floats;
    // each (id, vector) is written by one thread only (distinct ids), so there are no races.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching embedding_bwd", e))?;
    Ok(())
}
