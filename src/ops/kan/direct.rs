//! Launches of `cuda/kan_direct.cu`: the KANLinear forward straight from the parameters
//! (no features buffer, no folded weights, no GEMM), for small batches.

use super::KanLinear;
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{kernel_name, KernelModule};
use crate::tensor::{CudaElement, Tensor};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};
use std::ffi::c_void;

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
crate::kernels::assert_kernel_params!(DirectParams, 8);

// SAFETY: eight u32 fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for DirectParams {}

impl DirectParams {
    fn new(layer: &KanLinear, rows: usize, features_per_split: usize) -> DirectParams {
        let (c, grid) = (layer.config(), layer.grid());
        DirectParams {
            rows: rows as u32,
            in_features: c.in_features as u32,
            out_features: c.out_features as u32,
            n_knots: grid.n_knots() as u32,
            order: grid.order() as u32,
            uniform: u32::from(grid.is_uniform()),
            has_scaler: u32::from(layer.spline_scaler().is_some()),
            features_per_split: features_per_split as u32,
        }
    }
}

/// The `(rows, out)` output that kan_direct_reduce fills, and its element count (checked to
/// fit the kernels' 32-bit indices).
fn output<T: CudaElement>(dev: &CudaDevice, rows: usize, outf: usize) -> Result<(Tensor, usize)> {
    let n = rows * outf;
    if n > u32::MAX as usize {
        return Err(Error::invalid("x", "rows x out_features below 2^32", format!("{rows} x {outf}")));
    }
    // SAFETY (allocation): kan_direct_reduce writes all rows * out elements.
    let y = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, &[rows, outf])? };
    Ok((y, n))
}

/// W_base and the scaler as kernel arguments. Without a scaler the kernels never read that
/// pointer (has_scaler = 0); W_base stands in for it.
fn base_and_scaler<T: CudaElement>(
    layer: &KanLinear,
) -> Result<(&cudarc::driver::CudaSlice<T>, &cudarc::driver::CudaSlice<T>)> {
    let wb = layer.base_weight().cuda_slice::<T>("base_weight")?;
    let scaler = match layer.spline_scaler() {
        Some(t) => t.cuda_slice::<T>("spline_scaler")?,
        None => wb,
    };
    Ok((wb, scaler))
}

/// cuda/kan_direct.cu: BLOCK_ROWS, BLOCK_OUTS, CHUNK, the orders it instantiates, NBMAX.
const BLOCK_ROWS: usize = 64;
const BLOCK_OUTS: usize = 128;
const CHUNK: usize = 4;
const MAX_ORDER: usize = 3;
const MAX_BASES: usize = 8;
const BLOCK_THREADS: u32 = 256;
const MAX_GRID_Y: usize = 65_535;
/// cuda/kan_direct.cu, namespace hk_kan_mma: BM, BN, FEATS, SC_STRIDE, THREADS and the launch bounds.
const MMA_BLOCK_ROWS: usize = 128;
const MMA_BLOCK_OUTS: usize = 64;
const MMA_STAGE_FEATURES: usize = 8;
const MMA_SC_STRIDE: usize = 12;
const MMA_BLOCKS_PER_SM: usize = 2;
const MMA_THREADS: u32 = 128;
const MMA_NAME: &str = "kan_direct_tf32x3_forward_f32";
const MMA_FEATURES_NAME: &str = "kan_direct_tf32x3_features_f32";

/// Dynamic shared memory of the tensor-core kernel: A (128 rows) at a row stride of
/// 8 (nb + 1) + 4 words, and two buffers of B (64 outputs, same stride) with their 64 x 12
/// scalers.
fn mma_smem_bytes(nb: usize) -> usize {
    let stride = MMA_STAGE_FEATURES * (nb + 1) + 4;
    (MMA_BLOCK_ROWS * stride + 2 * MMA_BLOCK_OUTS * (stride + MMA_SC_STRIDE)) * 4
}

/// Why the direct forward cannot run this layer and input, or `None` when it can.
fn unsupported(layer: &KanLinear, rows: usize, block_rows: usize) -> Option<String> {
    let c = layer.config();
    if !(1..=MAX_ORDER).contains(&c.spline_order) {
        return Some(format!("spline order {} (the direct forward covers 1..={MAX_ORDER})", c.spline_order));
    }
    if c.n_bases() > MAX_BASES {
        return Some(format!("{} bases per feature (the direct forward covers up to {MAX_BASES})", c.n_bases()));
    }
    if rows.div_ceil(block_rows) > MAX_GRID_Y {
        return Some(format!("{rows} rows (the direct forward covers up to {})", MAX_GRID_Y * block_rows));
    }
    None
}

/// Up to this many rows `Auto` prefers the tensor-core direct forward for f32 layers: at
/// 100 rows it takes 57 us against the f32 GEMM pipeline's 130 us, at 4096 rows 1485 against
/// 1638 us (H100, 1000 x 1000 and 1024 x 1024, G = 5); larger batches were not measured.
const TF32X3_AUTO_MAX_ROWS: usize = 4096;

/// Whether `Auto` runs [`forward_tf32x3`] for `rows` rows of this layer: an f32 layer that
/// has not opted into TF32 (that opt-in asks for the TF32 GEMM), that the kernel covers, and
/// a batch where it was measured faster.
pub(super) fn tf32x3_preferred(layer: &KanLinear, rows: usize) -> bool {
    layer.dtype() == DType::F32
        && !layer.allow_tf32()
        && rows <= TF32X3_AUTO_MAX_ROWS
        && unsupported(layer, rows, MMA_BLOCK_ROWS).is_none()
}

fn forward_name(dtype: DType) -> String {
    kernel_name("kan_direct", "forward", dtype, "")
}

fn reduce_name(dtype: DType) -> String {
    kernel_name("kan_direct", "reduce", dtype, "")
}

/// Features per split of the feature range (split-K): as many splits as fill one wave of
/// resident blocks (`resident`, from the occupancy API) without starting a second one, each
/// split a whole number of CHUNKs.
fn features_per_split(resident: usize, tiles: usize, inf: usize, chunk: usize) -> usize {
    let want = (resident / tiles).max(1);
    let chunks = inf.div_ceil(chunk);
    chunks.div_ceil(want.min(chunks)) * chunk
}

pub(super) fn forward(
    layer: &KanLinear,
    dev: &CudaDevice,
    x: &Tensor,
    rows: usize,
    out_shape: &[usize],
) -> Result<Tensor> {
    if let Some(why) = unsupported(layer, rows, BLOCK_ROWS) {
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
    let (mut y, n) = output::<T>(dev, rows, outf)?;
    if n == 0 {
        return y.reshape(out_shape);
    }
    let name = forward_name(T::DTYPE);
    let resident = dev.resident_blocks(KernelModule::KanDirect, &name, BLOCK_THREADS)? as usize;
    let tiles = outf.div_ceil(BLOCK_OUTS) * rows.div_ceil(BLOCK_ROWS);
    let fps = features_per_split(resident, tiles, inf, CHUNK);
    let splits = inf.div_ceil(fps);
    // SAFETY (allocation): every (split, row, output) is written by the block that owns it.
    let mut partial = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[splits, rows, outf])? };
    let grid = layer.grid();
    let params = DirectParams::new(layer, rows, fps);
    let (wb, scaler) = base_and_scaler::<T>(layer)?;
    {
        let f = dev.function(KernelModule::KanDirect, &name)?;
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
    reduce_splits::<T>(dev, &partial, &mut y, n, splits, false)?;
    y.reshape(out_shape)
}

/// A kernel parameter for [`CudaDevice::launch_raw`]: a pointer to its value.
fn param<T>(value: &T) -> *mut c_void {
    value as *const T as *mut c_void
}

/// `y = sum over splits of partial`, in split order (kan_direct_reduce). `programmatic`:
/// launched with programmatic stream serialization after the products kernel, which it
/// waits for on the device (see cuda/kan_direct.cu).
fn reduce_splits<T: CudaElement>(
    dev: &CudaDevice,
    partial: &Tensor,
    y: &mut Tensor,
    n: usize,
    splits: usize,
    programmatic: bool,
) -> Result<()> {
    let name = reduce_name(T::DTYPE);
    let f = dev.function(KernelModule::KanDirect, &name)?;
    let cfg = dev.grid_stride_config(KernelModule::KanDirect, &name, BLOCK_THREADS, n, BLOCK_THREADS as usize)?;
    let (n32, s32) = (n as u32, splits as u32);
    let stream = dev.stream();
    let (partial_ptr, _partial_sync) = partial.cuda_slice::<f32>("partial")?.device_ptr(stream);
    let (y_ptr, _y_sync) = y.cuda_slice_mut::<T>("y")?.device_ptr_mut(stream);
    let mut params = [param(&partial_ptr), param(&y_ptr), param(&n32), param(&s32)];
    // SAFETY: kan_direct_reduce_<T>(const float* partial, T* y, uint32_t n, uint32_t
    // splits): partial holds splits * n floats, y n elements (the callers allocate both).
    // With `programmatic` the kernel executes griddepcontrol.wait before it reads partial or
    // writes y, and the caller has checked that the module is the compute_90 build.
    unsafe { dev.launch_raw(&f, cfg, &mut params, programmatic, "launching kan_direct_reduce") }
}

/// [`KanForwardPath::DirectTf32x3`](super::KanForwardPath::DirectTf32x3): the direct
/// forward on TF32 tensor cores with split operands, f32 only.
pub(super) fn forward_tf32x3(
    layer: &KanLinear,
    dev: &CudaDevice,
    x: &Tensor,
    rows: usize,
    out_shape: &[usize],
) -> Result<Tensor> {
    if layer.dtype() != DType::F32 {
        return Err(Error::invalid(
            "forward_path",
            "an f32 layer (DirectTf32x3 is the f32 tensor-core forward)",
            format!("a {} layer", layer.dtype()),
        ));
    }
    if let Some(why) = unsupported(layer, rows, MMA_BLOCK_ROWS) {
        return Err(Error::invalid("forward_path", "a layer the direct forward covers", why));
    }
    let c = layer.config();
    let (inf, outf) = (c.in_features, c.out_features);
    let (mut y, n) = output::<f32>(dev, rows, outf)?;
    if n == 0 {
        return y.reshape(out_shape);
    }
    let nb = c.n_bases();
    let smem = mma_smem_bytes(nb);
    let tiles = outf.div_ceil(MMA_BLOCK_OUTS) * rows.div_ceil(MMA_BLOCK_ROWS);
    let resident = MMA_BLOCKS_PER_SM * dev.multiprocessors() as usize;
    let fps = features_per_split(resident, tiles, inf, MMA_STAGE_FEATURES);
    let splits = inf.div_ceil(fps);
    // SAFETY (allocation): every (split, row, output) is written by the block that owns it.
    let mut partial = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[splits, rows, outf])? };
    let grid = layer.grid();
    let params = DirectParams::new(layer, rows, fps);
    // The A operand in stage tiles: ceil(in / 8) stages x rows_pad rows x 8 (nb + 1) words,
    // rows up to the last m16 tile (the kernel reads and multiplies no further).
    let rows_pad = rows.div_ceil(16) * 16;
    let stages = inf.div_ceil(MMA_STAGE_FEATURES);
    let k8 = MMA_STAGE_FEATURES * (nb + 1);
    if stages * rows_pad * MMA_STAGE_FEATURES > u32::MAX as usize {
        return Err(Error::invalid("x", "rows x in_features below 2^32", format!("{rows} x {inf}")));
    }
    let rows_pad32 = rows_pad as u32;
    // SAFETY (allocation): the features kernel writes every word (rows past the end and
    // features past the end as zeros).
    let mut a_tiles = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[stages, rows_pad, k8])? };
    {
        let f = dev.function(KernelModule::KanDirect, MMA_FEATURES_NAME)?;
        let threads = stages * rows_pad * MMA_STAGE_FEATURES;
        let cfg = dev.grid_stride_config(
            KernelModule::KanDirect,
            MMA_FEATURES_NAME,
            BLOCK_THREADS,
            threads,
            BLOCK_THREADS as usize,
        )?;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(x.cuda_slice::<f32>("x")?)
            .arg(grid.knots().cuda_slice::<f32>("grid")?)
            .arg(a_tiles.cuda_slice_mut::<f32>("a_tiles")?)
            .arg(&params)
            .arg(&rows_pad32);
        // SAFETY: kan_direct_tf32x3_features_f32(const float* x, const float* grid, float*
        // a_tiles, DirectParams, uint32_t rows_pad): x holds rows * in, grid in * n_knots,
        // a_tiles ceil(in / 8) * rows_pad * 8 (nb + 1) floats with nb = n_knots - 1 - order,
        // order in 1..=3 (unsupported() above); the kernel grid-strides over its threads.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching kan_direct_tf32x3_features", e))?;
    }
    let (wb, scaler) = base_and_scaler::<f32>(layer)?;
    // On sm_90 and up the products and the reduction start while the kernel before each
    // still runs (programmatic dependent launch): the launches and the products' first
    // weight copies overlap the features kernel.
    let programmatic = dev.programmatic_launch(KernelModule::KanDirect);
    {
        let f = dev.function(KernelModule::KanDirect, MMA_NAME)?;
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(|e| dev.map_err("setting kan_direct_tf32x3's shared memory", e))?;
        let cfg = LaunchConfig {
            grid_dim: (outf.div_ceil(MMA_BLOCK_OUTS) as u32, rows.div_ceil(MMA_BLOCK_ROWS) as u32, splits as u32),
            block_dim: (MMA_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let stream = dev.stream();
        let (a_ptr, _a_sync) = a_tiles.cuda_slice::<f32>("a_tiles")?.device_ptr(stream);
        let (wb_ptr, _wb_sync) = wb.device_ptr(stream);
        let (ws_ptr, _ws_sync) = layer.spline_weight().cuda_slice::<f32>("spline_weight")?.device_ptr(stream);
        let (sc_ptr, _sc_sync) = scaler.device_ptr(stream);
        let (partial_ptr, _partial_sync) = partial.cuda_slice_mut::<f32>("partial")?.device_ptr_mut(stream);
        let mut args = [
            param(&a_ptr),
            param(&rows_pad32),
            param(&wb_ptr),
            param(&ws_ptr),
            param(&sc_ptr),
            param(&partial_ptr),
            param(&params),
        ];
        // SAFETY: kan_direct_tf32x3_forward_f32(const float* a_tiles, uint32_t rows_pad,
        // const float* w_base, const float* w_spline, const float* scaler, float* partial,
        // DirectParams): a_tiles as written above (a block reads rows r0 up to its last live
        // m16 tile, below rows_pad = rows rounded up to 16); w_base and scaler out * in, w_spline
        // out * in * nb (nb <= 8, order in 1..=3 by unsupported()), all f32 (checked above),
        // partial splits * rows * out; the grid is (ceil(out/64), ceil(rows/128), splits) with
        // splits * fps >= in and fps a multiple of 8, and the dynamic shared memory is
        // mma_smem_bytes(nb), the layout the kernel carves. With `programmatic`: before its
        // griddepcontrol.wait the kernel reads only w_base, w_spline and the scaler and
        // writes only shared memory. The features kernel does not write those parameters,
        // and whatever wrote them earlier has completed: the features kernel, launched
        // without the attribute, started only after it. The module is the compute_90 build
        // (programmatic_launch).
        unsafe { dev.launch_raw(&f, cfg, &mut args, programmatic, "launching kan_direct_tf32x3_forward") }?;
    }
    reduce_splits::<f32>(dev, &partial, &mut y, n, splits, programmatic)?;
    y.reshape(out_shape)
}
