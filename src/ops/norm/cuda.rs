//! Launches of `cuda/norm.cu`.

use super::{Norm, NormDims, NormGrads, NormKind, NormStats};
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{kernel_name, KernelModule};
use crate::ops::{push_opt, push_opt_mut};
use crate::tensor::{CudaElement, Tensor};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// Mirrors `hk_norm::NormParams` in cuda/norm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct NormParams {
    rows: u32,
    dim: u32,
    groups: u32,
    flags: u32,
    eps: f32,
    blocks: u32,
}
crate::kernels::assert_kernel_params!(NormParams, 6);

// SAFETY: six 4-byte fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for NormParams {}

// hk_norm's flags.
const RMS: u32 = 1;
const BIAS: u32 = 2;
const RESIDUAL: u32 = 4;
const RESIDUAL_OUT: u32 = 8;

/// `hk_norm::MAX_THREADS`, the kernels' launch bound.
const MAX_THREADS: usize = 512;
/// Partial rows per segment of the first reduction pass: 64 (8 per warp row) keeps a thread's
/// chain of dependent loads short while the segments spread over the GPU.
const SEGMENT: usize = 64;

/// One instantiation of the kernels: `vec` elements per 16-byte access (1 when dim is not a
/// multiple of it), `vpt` vectors per thread kept in registers, `threads` per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Variant {
    vec: usize,
    vpt: usize,
    threads: u32,
}

/// The instantiation for groups of `dim` elements of `dtype`: four cached vectors per thread in
/// the forward, two in the backward (four when scalar), and the threads that cover the group
/// with them (at most 512; longer groups stream their remainder a second time).
fn variant(dtype: DType, dim: usize, backward: bool) -> Variant {
    let full = 16 / dtype.size_in_bytes();
    let vec = if dim % full == 0 { full } else { 1 };
    // The instantiations of cuda/norm.cu (HK_NORM_TYPE).
    let vpt = if backward && vec > 1 { 2 } else { 4 };
    let threads = (dim / vec).div_ceil(vpt).next_multiple_of(32).clamp(32, MAX_THREADS) as u32;
    Variant { vec, vpt, threads }
}

fn flags(kind: NormKind) -> u32 {
    match kind {
        NormKind::Rms => RMS,
        NormKind::Layer => 0,
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    dev: &CudaDevice,
    x: &Tensor,
    residual: Option<&Tensor>,
    w: &Tensor,
    b: Option<&Tensor>,
    norm: Norm,
    d: &NormDims,
    stats_shape: &[usize],
    write_z: bool,
) -> Result<(Tensor, Option<Tensor>, NormStats)> {
    match d.dtype {
        DType::F32 => forward_typed::<f32>(dev, x, residual, w, b, norm, d, stats_shape, write_z),
        DType::BF16 => forward_typed::<bf16>(dev, x, residual, w, b, norm, d, stats_shape, write_z),
        DType::F16 => forward_typed::<f16>(dev, x, residual, w, b, norm, d, stats_shape, write_z),
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_typed<T: CudaElement>(
    dev: &CudaDevice,
    x: &Tensor,
    residual: Option<&Tensor>,
    w: &Tensor,
    b: Option<&Tensor>,
    norm: Norm,
    d: &NormDims,
    stats_shape: &[usize],
    write_z: bool,
) -> Result<(Tensor, Option<Tensor>, NormStats)> {
    // SAFETY (allocations): norm_fwd writes every element of y, of z when asked, of rstd, and
    // of mean for LayerNorm (a block per group-row, every vector of it).
    let mut y = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, x.shape())? };
    let mut z = if write_z { Some(unsafe { Tensor::cuda_uninit(dev, DType::F32, x.shape())? }) } else { None };
    let mut rstd = unsafe { Tensor::cuda_uninit(dev, DType::F32, stats_shape)? };
    let mut mean = match norm.kind {
        NormKind::Layer => Some(unsafe { Tensor::cuda_uninit(dev, DType::F32, stats_shape)? }),
        NormKind::Rms => None,
    };
    let group_rows = d.group_rows();
    if group_rows > 0 {
        let v = variant(d.dtype, d.dim, false);
        let kernel = kernel_name("norm", "fwd", T::DTYPE, &format!("_v{}_p{}", v.vec, v.vpt));
        let f = dev.function(KernelModule::Norm, &kernel)?;
        let cfg = dev.grid_stride_config(KernelModule::Norm, &kernel, v.threads, group_rows, 1)?;
        let mut fl = flags(norm.kind);
        fl |= if b.is_some() { BIAS } else { 0 };
        fl |= if residual.is_some() { RESIDUAL } else { 0 };
        fl |= if write_z { RESIDUAL_OUT } else { 0 };
        let p = NormParams {
            rows: group_rows as u32,
            dim: d.dim as u32,
            groups: d.groups as u32,
            flags: fl,
            eps: norm.eps,
            blocks: cfg.grid_dim.0,
        };
        let null = 0u64;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(x.cuda_slice::<T>("x")?);
        push_opt::<f32>(&mut args, residual, "residual", &null)?;
        args.arg(w.cuda_slice::<f32>("weight")?);
        push_opt::<f32>(&mut args, b, "bias", &null)?;
        args.arg(y.cuda_slice_mut::<T>("y")?);
        push_opt_mut::<f32>(&mut args, z.as_mut(), "residual", &null)?;
        push_opt_mut::<f32>(&mut args, mean.as_mut(), "mean", &null)?;
        args.arg(rstd.cuda_slice_mut::<f32>("rstd")?).arg(&p);
        // SAFETY: norm_fwd_<T>_v<vec>_p<vpt>(const T* x, const float* residual, const float* w,
        // const float* b, T* y, float* z, float* mean, float* rstd, NormParams): x, y, residual
        // and z hold rows * groups * dim elements (validated in `dims`, group-rows and the width
        // below 2^32), w and b groups * dim, mean and rstd group-rows; each optional pointer is
        // null exactly when its flag is clear (mean: RMS set); dim is a multiple of vec and the
        // buffers start 256-byte aligned, as the vector accesses need; threads <= MAX_THREADS,
        // a multiple of 32 as the block reduction needs.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching norm_fwd", e))?;
    }
    Ok((y, z, NormStats { norm, mean, rstd }))
}

/// The backward's inputs (see [`super::backward`]).
pub(super) struct BackwardArgs<'a> {
    pub z: &'a Tensor,
    pub weight: &'a Tensor,
    pub want_dbias: bool,
    pub stats: &'a NormStats,
    pub dy: &'a Tensor,
    pub dresidual: Option<&'a Tensor>,
    pub write_dresidual: bool,
}

pub(super) fn backward(dev: &CudaDevice, a: BackwardArgs, d: &NormDims) -> Result<NormGrads> {
    match (d.dtype, a.z.dtype()) {
        (DType::F32, DType::F32) => backward_typed::<f32, f32>(dev, a, d),
        (DType::BF16, DType::BF16) => backward_typed::<bf16, bf16>(dev, a, d),
        (DType::F16, DType::F16) => backward_typed::<f16, f16>(dev, a, d),
        (DType::BF16, DType::F32) => backward_typed::<bf16, f32>(dev, a, d),
        (DType::F16, DType::F32) => backward_typed::<f16, f32>(dev, a, d),
        (dt, zt) => Err(Error::DTypeMismatch {
            arg: "dy",
            expected: format!("{zt} (the normalised input's type) or a 16-bit type with an f32 residual"),
            found: dt.to_string(),
        }),
    }
}

fn backward_typed<T: CudaElement, Z: CudaElement>(
    dev: &CudaDevice,
    a: BackwardArgs,
    d: &NormDims,
) -> Result<NormGrads> {
    let v = variant(d.dtype, d.dim, true);
    let zf32 = if Z::DTYPE != T::DTYPE { "_zf32" } else { "" };
    let kernel = kernel_name("norm", "bwd", T::DTYPE, &format!("_v{}_p{}{zf32}", v.vec, v.vpt));
    let f = dev.function(KernelModule::Norm, &kernel)?;
    // A one-wave grid (at least one block, also without rows: it writes zero partial rows).
    let cfg = dev.grid_stride_config(KernelModule::Norm, &kernel, v.threads, d.group_rows(), 1)?;
    let blocks = cfg.grid_dim.0;
    let width = d.groups * d.dim;
    let halves = if a.want_dbias { 2 } else { 1 };
    let partial_len = (blocks as usize).checked_mul(width).and_then(|n| n.checked_mul(halves));
    crate::memory::check_buffers(&crate::device::Device::Cuda(dev.clone()), &[("x", partial_len, 4)])?;
    // SAFETY (allocations): norm_bwd writes every element of dx, of dz when asked, and every
    // float of its blocks' partial rows (the whole buffer: blocks = the grid);
    // norm_reduce_partials every element of dweight and dbias.
    let mut dx = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, a.z.shape())? };
    let mut dz =
        if a.write_dresidual { Some(unsafe { Tensor::cuda_uninit(dev, DType::F32, a.z.shape())? }) } else { None };
    let mut partial = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[halves * blocks as usize, width])? };
    let mut dweight = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[width])? };
    let mut dbias = if a.want_dbias { Some(unsafe { Tensor::cuda_uninit(dev, DType::F32, &[width])? }) } else { None };
    let mut fl = flags(a.stats.norm.kind);
    fl |= if a.want_dbias { BIAS } else { 0 };
    fl |= if a.dresidual.is_some() { RESIDUAL } else { 0 };
    fl |= if a.write_dresidual { RESIDUAL_OUT } else { 0 };
    let p = NormParams {
        rows: d.group_rows() as u32,
        dim: d.dim as u32,
        groups: d.groups as u32,
        flags: fl,
        eps: a.stats.norm.eps,
        blocks,
    };
    let null = 0u64;
    let mut args = dev.stream().launch_builder(&f);
    args.arg(a.z.cuda_slice::<Z>("x")?).arg(a.weight.cuda_slice::<f32>("weight")?);
    push_opt::<f32>(&mut args, a.stats.mean.as_ref(), "mean", &null)?;
    args.arg(a.stats.rstd.cuda_slice::<f32>("rstd")?).arg(a.dy.cuda_slice::<T>("dy")?);
    push_opt::<f32>(&mut args, a.dresidual, "dresidual", &null)?;
    args.arg(dx.cuda_slice_mut::<T>("dx")?);
    push_opt_mut::<f32>(&mut args, dz.as_mut(), "dresidual", &null)?;
    args.arg(partial.cuda_slice_mut::<f32>("partial")?).arg(&p);
    // SAFETY: norm_bwd_<T>_v<vec>_p<vpt>[_zf32](const Z* z, const float* w, const float* mean,
    // const float* rstd, const T* dy, const float* dresidual, T* dx, float* dz, float* partial,
    // NormParams): z, dy, dx, dresidual and dz hold rows * groups * dim elements, w groups *
    // dim, mean and rstd group-rows (checked in `check_stats`); mean is null exactly for
    // RMSNorm, dresidual and dz exactly when their flags are clear; partial holds (1 or 2 with
    // BIAS) * blocks * groups * dim floats with blocks = the grid; dim is a multiple of vec;
    // threads a multiple of 32, at most MAX_THREADS.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching norm_bwd", e))?;

    // Two passes over the partial rows: `segments` segments of up to SEGMENT rows each, in
    // parallel, then the segments' sums.
    let rows = blocks as usize;
    let segments = rows.div_ceil(SEGMENT);
    // SAFETY (allocation): the first pass writes every (half, segment, column).
    let mut segment_sums = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[halves * segments, width])? };
    let name = "norm_reduce_partials";
    let f = dev.function(KernelModule::Norm, name)?;
    let cfg = |segments: usize| LaunchConfig {
        grid_dim: (width.div_ceil(32) as u32, segments as u32, halves as u32),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    let (cols, nrows, seg_len) = (width as u32, rows as u32, SEGMENT as u32);
    {
        let sums = segment_sums.cuda_slice_mut::<f32>("partial")?;
        let (mut first, mut second) = sums
            .try_split_at_mut(segments * width)
            .ok_or_else(|| Error::invalid("x", "a partial-sum buffer of two halves", "a shorter one"))?;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(partial.cuda_slice::<f32>("partial")?).arg(&mut first);
        if a.want_dbias {
            args.arg(&mut second);
        } else {
            args.arg(&null);
        }
        args.arg(&cols).arg(&nrows).arg(&seg_len);
        // SAFETY: norm_reduce_partials(const float* in, float* out_w, float* out_b, u32 cols, u32
        // rows, u32 seg_len): in holds halves * rows * cols floats (the partial rows), out_w and
        // out_b (the latter only when grid.z is 2, else null and unwritten) segments * cols each,
        // the halves of segment_sums; segments * seg_len covers the rows; block (32, 8).
        unsafe { args.launch(cfg(segments)) }.map_err(|e| dev.map_err("launching norm_reduce_partials", e))?;
    }
    let (nsegments, all) = (segments as u32, segments as u32);
    let mut args = dev.stream().launch_builder(&f);
    args.arg(segment_sums.cuda_slice::<f32>("partial")?).arg(dweight.cuda_slice_mut::<f32>("dweight")?);
    push_opt_mut::<f32>(&mut args, dbias.as_mut(), "dbias", &null)?;
    args.arg(&cols).arg(&nsegments).arg(&all);
    // SAFETY: as above with in = segment_sums (halves * segments * cols floats, written by the
    // first pass), one segment of all its rows, out_w = dweight and out_b = dbias (cols each;
    // dbias null exactly when grid.z is 1).
    unsafe { args.launch(cfg(1)) }.map_err(|e| dev.map_err("launching norm_reduce_partials", e))?;
    Ok(NormGrads { dx, dresidual: dz, dweight, dbias })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chosen_variant_is_a_kernel_of_the_module() {
        let ptx = KernelModule::Norm.ptx();
        for dtype in DType::ALL {
            for dim in [1, 7, 8, 33, 96, 768, 1025, 2048, 4096, 4100, 8192, 65536] {
                for backward in [false, true] {
                    let v = variant(dtype, dim, backward);
                    assert_eq!(dim % v.vec, 0);
                    assert!(v.threads % 32 == 0 && (32..=512).contains(&v.threads), "{v:?}");
                    let name = kernel_name(
                        "norm",
                        if backward { "bwd" } else { "fwd" },
                        dtype,
                        &format!("_v{}_p{}", v.vec, v.vpt),
                    );
                    assert!(ptx.contains(&format!(".entry {name}(")), "{name} is not in the module");
                    if backward && dtype != DType::F32 {
                        assert!(ptx.contains(&format!(".entry {name}_zf32(")), "{name}_zf32 is not in the module");
                    }
                }
            }
        }
        assert_eq!(variant(DType::BF16, 768, false), Variant { vec: 8, vpt: 4, threads: 32 });
        assert_eq!(variant(DType::BF16, 4096, true), Variant { vec: 8, vpt: 2, threads: 256 });
    }
}
