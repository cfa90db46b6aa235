//! Launches of `cuda/kan_direct.cu`: the KANLinear forward straight from the parameters
//! (no features buffer, no folded weights, no GEMM), for small batches.

use super::KanLinear;
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::KernelModule;
use crate::tensor::{CudaElement, Tensor};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// Mirrors `hk_kan_direct::DirectParams` in cuda/kan_direct.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct DirectParams {
    rows: u32,
    in_features: u32,
    out_features: u32,
    n_knots: u32,
    order: u32,
    uniform: u32,
    has_scaler: u32,
    features_per_split: u32,
}

// SAFETY: eight u32 fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for DirectParams {}

/// cuda/kan_direct.cu: BLOCK_ROWS, BLOCK_OUTS, CHUNK, the orders it instantiates, NBMAX.
const BLOCK_ROWS: usize = 64;
const BLOCK_OUTS: usize = 128;
const CHUNK: usize = 4;
const MAX_ORDER: usize = 3;
const MAX_BASES: usize = 8;
const BLOCK_THREADS: u32 = 256;
const MAX_GRID_Y: usize = 65_535;

/// Why the direct forward cannot run this layer and input, or `None` when it can.
fn unsupported(layer: &KanLinear, rows: usize) -> Option<String> {
    let c = layer.config();
    if !(1..=MAX_ORDER).contains(&c.spline_order) {
        return Some(format!("spline order {} (the direct forward covers 1..={MAX_ORDER})", c.spline_order));
    }
    if c.n_bases() > MAX_BASES {
        return Some(format!("{} bases per feature (the direct forward covers up to {MAX_BASES})", c.n_bases()));
    }
    if rows.div_ceil(BLOCK_ROWS) > MAX_GRID_Y {
        return Some(format!("{rows} rows (the direct forward covers up to {})", MAX_GRID_Y * BLOCK_ROWS));
    }
    None
}

fn forward_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "kan_direct_forward_f32",
        DType::BF16 => "kan_direct_forward_bf16",
        DType::F16 => "kan_direct_forward_f16",
    }
}

fn reduce_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "kan_direct_reduce_f32",
        DType::BF16 => "kan_direct_reduce_bf16",
        DType::F16 => "kan_direct_reduce_f16",
    }
}

/// Features per split of the feature range (split-K): as many splits as fill one wave of
/// resident blocks (`resident`, from the occupancy API) without starting a second one, each
/// split a whole number of CHUNKs.
fn features_per_split(resident: usize, rows: usize, inf: usize, outf: usize) -> usize {
    let tiles = outf.div_ceil(BLOCK_OUTS) * rows.div_ceil(BLOCK_ROWS);
    let want = (resident / tiles).max(1);
    let chunks = inf.div_ceil(CHUNK);
    chunks.div_ceil(want.min(chunks)) * CHUNK
}

pub(super) fn forward(
    layer: &KanLinear,
    dev: &CudaDevice,
    x: &Tensor,
    rows: usize,
    out_shape: &[usize],
) -> Result<Tensor> {
    if let Some(why) = unsupported(layer, rows) {
        return Err(Error::invalid("forward_path", "a layer the direct forward covers", why));
    }
    match layer.dtype() {
        DType::F32 => forward_typed::<f32>(layer, dev, x, rows, out_shape),
        DType::BF16 => forward_typed::<bf16>(layer, dev, x, rows, out_shape),
        DType::F16 => forward_typed::<f16>(layer, dev, x, rows, out_shape),
    }
}

fn forward_typed<T: CudaElement>(
    layer: &KanLinear,
    dev: &CudaDevice,
    x: &Tensor,
    rows: usize,
    out_shape: &[usize],
) -> Result<Tensor> {
    let c = layer.config();
    let (inf, outf) = (c.in_features, c.out_features);
    // SAFETY (allocation): kan_direct_reduce writes all rows * out elements.
    let mut y = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, &[rows, outf])? };
    let n = rows * outf;
    if n == 0 {
        return y.reshape(out_shape);
    }
    if n > u32::MAX as usize {
        return Err(Error::invalid("x", "rows x out_features below 2^32", format!("{rows} x {outf}")));
    }
    let name = forward_name(T::DTYPE);
    let resident = dev.resident_blocks(KernelModule::KanDirect, name, BLOCK_THREADS)? as usize;
    let fps = features_per_split(resident, rows, inf, outf);
    let splits = inf.div_ceil(fps);
    // SAFETY (allocation): every (split, row, output) is written by the block that owns it.
    let mut partial = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[splits, rows, outf])? };
    let grid = layer.grid();
    let params = DirectParams {
        rows: rows as u32,
        in_features: inf as u32,
        out_features: outf as u32,
        n_knots: grid.n_knots() as u32,
        order: grid.order() as u32,
        uniform: u32::from(grid.is_uniform()),
        has_scaler: u32::from(layer.spline_scaler().is_some()),
        features_per_split: fps as u32,
    };
    let wb = layer.base_weight().cuda_slice::<T>("base_weight")?;
    // Without a scaler the kernel never reads this pointer; W_base stands in for it.
    let scaler = match layer.spline_scaler() {
        Some(t) => t.cuda_slice::<T>("spline_scaler")?,
        None => wb,
    };
    {
        let f = dev.function(KernelModule::KanDirect, name)?;
        let cfg = LaunchConfig {
            grid_dim: (outf.div_ceil(BLOCK_OUTS) as u32, rows.div_ceil(BLOCK_ROWS) as u32, splits as u32),
            block_dim: (BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = dev.stream().launch_builder(&f);
        args.arg(x.cuda_slice::<T>("x")?)
            .arg(grid.knots().cuda_slice::<f32>("grid")?)
            .arg(wb)
            .arg(layer.spline_weight().cuda_slice::<T>("spline_weight")?)
            .arg(scaler)
            .arg(partial.cuda_slice_mut::<f32>("partial")?)
            .arg(&params);
        // SAFETY: kan_direct_forward_<T>(const T* x, const float* grid, const T*
        // w_base, const T* w_spline, const T* scaler, float* partial, DirectParams): x holds
        // rows * in, grid in * n_knots, w_base and scaler out * in (scaler read only with
        // has_scaler), w_spline out * in * nb with nb <= NBMAX = 8 and
        // order in 1..=3 (unsupported() above), partial splits * rows * out; the grid is
        // (ceil(out/128), ceil(rows/64), splits) with splits * fps >= in, as the kernel expects.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching kan_direct_forward", e))?;
    }
    {
        let name = reduce_name(T::DTYPE);
        let f = dev.function(KernelModule::KanDirect, name)?;
        let cfg = dev.grid_stride_config(KernelModule::KanDirect, name, BLOCK_THREADS, n, BLOCK_THREADS as usize)?;
        let (n32, s32) = (n as u32, splits as u32);
        let mut args = dev.stream().launch_builder(&f);
        args.arg(partial.cuda_slice::<f32>("partial")?).arg(y.cuda_slice_mut::<T>("y")?).arg(&n32).arg(&s32);
        // SAFETY: kan_direct_reduce_<T>(const float* partial, T* y, uint32_t n, uint32_t
        // splits): partial holds splits * n floats, y n elements.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching kan_direct_reduce", e))?;
    }
    y.reshape(out_shape)
}
