//! The KANLinear GPU pipeline: `cuda/kan.cu` kernels, the B-spline basis kernel and cuBLAS.

use super::{KanGrads, KanLinear};
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gemm::{gemm, GemmShape, Layout};
use crate::kernels::{kernel_name, KernelModule};
use crate::ops::bspline::cuda::BsplineParams;
use crate::tensor::{CudaElement, Tensor};
use cudarc::driver::{DeviceRepr, PushKernelArg};
use half::{bf16, f16};

/// Mirrors `hk_kan::InputGradParams` in cuda/kan.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct InputGradParams {
    n_rows: u32,
    in_features: u32,
    n_knots: u32,
    order: u32,
    uniform: u32,
}
crate::kernels::assert_kernel_params!(InputGradParams, 5);

// SAFETY: five u32 fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for InputGradParams {}

const BLOCK_THREADS: u32 = 256;
/// kan_features: 8 warps of 32 rows per block.
const FEATURE_ROWS_PER_BLOCK: usize = 256;

#[derive(Clone, Copy)]
enum Kernel {
    Features,
    FoldWeights,
    SplitGrads,
    InputGrad,
}

/// `kan_<kernel>_<dtype>`.
fn name(kernel: Kernel, dtype: DType) -> String {
    let variant = match kernel {
        Kernel::Features => "features",
        Kernel::FoldWeights => "fold_weights",
        Kernel::SplitGrads => "split_grads",
        Kernel::InputGrad => "input_grad",
    };
    kernel_name("kan", variant, dtype, "")
}

/// Row and feature counts of one call, checked against the kernels' 32-bit indices.
#[derive(Clone, Copy)]
struct Sizes {
    rows: usize,
    inf: usize,
    outf: usize,
    nb: usize,
}

impl Sizes {
    /// Columns of the GEMM operands: in * (1 + nb).
    fn cols(&self) -> usize {
        self.inf * (1 + self.nb)
    }
}

fn sizes(layer: &KanLinear, rows: usize) -> Result<Sizes> {
    let c = layer.config();
    let s = Sizes { rows, inf: c.in_features, outf: c.out_features, nb: c.n_bases() };
    if rows.checked_mul(s.inf).is_none_or(|e| e >= u32::MAX as usize - 256) {
        return Err(Error::invalid(
            "x",
            "fewer than 2^32 elements (batch x in_features)",
            format!("{rows} x {}", s.inf),
        ));
    }
    if s.outf.checked_mul(s.inf).is_none_or(|e| e > u32::MAX as usize) {
        return Err(Error::invalid("out_features", "out x in below 2^32", format!("{} x {}", s.outf, s.inf)));
    }
    Ok(s)
}

pub(super) fn forward(
    layer: &KanLinear,
    dev: &CudaDevice,
    x: &Tensor,
    rows: usize,
    out_shape: &[usize],
) -> Result<Tensor> {
    let s = sizes(layer, rows)?;
    match layer.dtype() {
        DType::F32 => forward_typed::<f32>(layer, dev, x, s, out_shape),
        DType::BF16 => forward_typed::<bf16>(layer, dev, x, s, out_shape),
        DType::F16 => forward_typed::<f16>(layer, dev, x, s, out_shape),
    }
}

pub(super) fn backward(layer: &KanLinear, dev: &CudaDevice, x: &Tensor, dy: &Tensor, rows: usize) -> Result<KanGrads> {
    let s = sizes(layer, rows)?;
    match layer.dtype() {
        DType::F32 => backward_typed::<f32>(layer, dev, x, dy, s),
        DType::BF16 => backward_typed::<bf16>(layer, dev, x, dy, s),
        DType::F16 => backward_typed::<f16>(layer, dev, x, dy, s),
    }
}

/// A = [SiLU(x) | B(x)]: (rows, in * (1 + nb)).
fn features<T: CudaElement>(layer: &KanLinear, dev: &CudaDevice, x: &Tensor, s: Sizes) -> Result<Tensor> {
    // SAFETY (allocation): kan_features writes all rows * in * (1 + nb) elements.
    let mut a = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, &[s.rows, s.cols()])? };
    let n_rows = s.rows * s.inf;
    if n_rows == 0 {
        return Ok(a);
    }
    let grid = layer.grid();
    let kernel = name(Kernel::Features, T::DTYPE);
    let f = dev.function(KernelModule::Kan, &kernel)?;
    let cfg = dev.grid_stride_config(KernelModule::Kan, &kernel, BLOCK_THREADS, n_rows, FEATURE_ROWS_PER_BLOCK)?;
    let params = BsplineParams {
        n_rows: n_rows as u32,
        in_features: s.inf as u32,
        n_knots: grid.n_knots() as u32,
        order: grid.order() as u32,
        uniform: u32::from(grid.is_uniform()),
    };
    let xs = x.cuda_slice::<T>("x")?;
    let knots = grid.knots().cuda_slice::<f32>("grid")?;
    let out = a.cuda_slice_mut::<T>("features")?;
    let mut args = dev.stream().launch_builder(&f);
    args.arg(xs).arg(knots).arg(out).arg(&params);
    // SAFETY: kan_features_<T>(const T* x, const float* grid, T* out, BsplineParams): x holds
    // n_rows values, out n_rows * (1 + nb), grid in * n_knots with order <= 7 (KnotGrid); the
    // kernel writes out[row * (1 + nb) + c] for row < n_rows, c <= nb, and clamps knot indices.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching kan_features", e))?;
    Ok(a)
}

/// W_cat = [W_base | W_spline * scaler]: (out, in * (1 + nb)).
fn fold_weights<T: CudaElement>(layer: &KanLinear, dev: &CudaDevice, s: Sizes) -> Result<Tensor> {
    // SAFETY (allocation): kan_fold_weights writes all out * in * (1 + nb) elements.
    let mut w = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, &[s.outf, s.cols()])? };
    let n_oi = s.outf * s.inf;
    let kernel = name(Kernel::FoldWeights, T::DTYPE);
    let f = dev.function(KernelModule::Kan, &kernel)?;
    let cfg =
        dev.grid_stride_config(KernelModule::Kan, &kernel, BLOCK_THREADS, n_oi * (1 + s.nb), BLOCK_THREADS as usize)?;
    let wb = layer.base_weight().cuda_slice::<T>("base_weight")?;
    let ws = layer.spline_weight().cuda_slice::<T>("spline_weight")?;
    // Without a scaler the kernel never reads this pointer; W_base stands in for it.
    let (scaler, has_scaler) = match layer.spline_scaler() {
        Some(t) => (t.cuda_slice::<T>("spline_scaler")?, 1u32),
        None => (wb, 0u32),
    };
    let (n32, nb32) = (n_oi as u32, s.nb as u32);
    let out = w.cuda_slice_mut::<T>("w_cat")?;
    let mut args = dev.stream().launch_builder(&f);
    args.arg(wb).arg(ws).arg(scaler).arg(&has_scaler).arg(out).arg(&n32).arg(&nb32);
    // SAFETY: kan_fold_weights_<T>(const T* w_base, const T* w_spline, const T* scaler,
    // uint32_t has_scaler, T* w_cat, uint32_t n_oi, uint32_t nb): w_base and scaler hold n_oi
    // elements (scaler only read when has_scaler), w_spline n_oi * nb, w_cat n_oi * (1 + nb).
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching kan_fold_weights", e))?;
    Ok(w)
}

fn forward_typed<T: CudaElement>(
    layer: &KanLinear,
    dev: &CudaDevice,
    x: &Tensor,
    s: Sizes,
    out_shape: &[usize],
) -> Result<Tensor> {
    let a = features::<T>(layer, dev, x, s)?;
    let w = fold_weights::<T>(layer, dev, s)?;
    // SAFETY (allocation): the GEMM (beta = 0) writes all rows * out elements.
    let mut y = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, &[s.rows, s.outf])? };
    gemm(
        dev,
        GemmShape { m: s.rows, n: s.outf, k: s.cols() },
        1.0,
        a.cuda_slice::<T>("features")?,
        Layout::AsIs,
        w.cuda_slice::<T>("w_cat")?,
        Layout::Transposed,
        0.0,
        y.cuda_slice_mut::<T>("y")?,
        layer.allow_tf32(),
    )?;
    y.reshape(out_shape)
}

fn backward_typed<T: CudaElement>(
    layer: &KanLinear,
    dev: &CudaDevice,
    x: &Tensor,
    dy: &Tensor,
    s: Sizes,
) -> Result<KanGrads> {
    let dtype = T::DTYPE;
    let tf32 = layer.allow_tf32();
    let mut a = features::<T>(layer, dev, x, s)?;
    let w = fold_weights::<T>(layer, dev, s)?;
    let dys = dy.cuda_slice::<T>("dy")?;
    // SAFETY (allocations): d_cat by its GEMM (beta = 0), dx by kan_input_grad, the split
    // outputs by kan_split_grads; each writes every element.
    let mut d_cat = unsafe { Tensor::cuda_uninit(dev, dtype, &[s.outf, s.cols()])? };
    let mut dx = unsafe { Tensor::cuda_uninit(dev, dtype, x.shape())? };
    // dW_cat = dy^T A, while A still holds the features.
    gemm(
        dev,
        GemmShape { m: s.outf, n: s.cols(), k: s.rows },
        1.0,
        dys,
        Layout::Transposed,
        a.cuda_slice::<T>("features")?,
        Layout::AsIs,
        0.0,
        d_cat.cuda_slice_mut::<T>("d_cat")?,
        tf32,
    )?;
    // dA = dy W_cat, written over A.
    gemm(
        dev,
        GemmShape { m: s.rows, n: s.cols(), k: s.outf },
        1.0,
        dys,
        Layout::AsIs,
        w.cuda_slice::<T>("w_cat")?,
        Layout::AsIs,
        0.0,
        a.cuda_slice_mut::<T>("d_features")?,
        tf32,
    )?;
    let n_rows = s.rows * s.inf;
    if n_rows > 0 {
        let kernel = name(Kernel::InputGrad, dtype);
        let func = dev.function(KernelModule::Kan, &kernel)?;
        let cfg = dev.grid_stride_config(KernelModule::Kan, &kernel, BLOCK_THREADS, n_rows, BLOCK_THREADS as usize)?;
        let grid = layer.grid();
        let params = InputGradParams {
            n_rows: n_rows as u32,
            in_features: s.inf as u32,
            n_knots: grid.n_knots() as u32,
            order: grid.order() as u32,
            uniform: u32::from(grid.is_uniform()),
        };
        let mut args = dev.stream().launch_builder(&func);
        args.arg(x.cuda_slice::<T>("x")?)
            .arg(grid.knots().cuda_slice::<f32>("grid")?)
            .arg(a.cuda_slice::<T>("d_features")?)
            .arg(dx.cuda_slice_mut::<T>("dx")?)
            .arg(&params);
        // SAFETY: kan_input_grad_<T>(const T* x, const float* grid, const T* d_features, T* dx,
        // InputGradParams): x and dx hold n_rows = rows * in elements, d_features n_rows *
        // (1 + nb), grid in * n_knots (order <= 7); the kernel reads d_features only at
        // row * (1 + nb) + c for c <= nb and clamps knot indices into the row.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching kan_input_grad", e))?;
    }
    let n_oi = s.outf * s.inf;
    // SAFETY (allocations): kan_split_grads writes every element of these (d_scaler only
    // when there is a scaler; otherwise it is not allocated).
    let mut d_base = unsafe { Tensor::cuda_uninit(dev, dtype, &[s.outf, s.inf])? };
    let mut d_spline = unsafe { Tensor::cuda_uninit(dev, dtype, &[s.outf, s.inf, s.nb])? };
    let mut d_scaler = match layer.spline_scaler() {
        Some(_) => Some(unsafe { Tensor::cuda_uninit(dev, dtype, &[s.outf, s.inf])? }),
        None => None,
    };
    {
        let kernel = name(Kernel::SplitGrads, dtype);
        let func = dev.function(KernelModule::Kan, &kernel)?;
        let cfg = dev.grid_stride_config(KernelModule::Kan, &kernel, BLOCK_THREADS, n_oi, BLOCK_THREADS as usize)?;
        let ws = layer.spline_weight().cuda_slice::<T>("spline_weight")?;
        let has_scaler = u32::from(layer.spline_scaler().is_some());
        // Without a scaler these pointers are never touched by the kernel; W_spline stands in.
        let scaler = match layer.spline_scaler() {
            Some(t) => t.cuda_slice::<T>("spline_scaler")?,
            None => ws,
        };
        let (n32, nb32) = (n_oi as u32, s.nb as u32);
        let d_base_s = d_base.cuda_slice_mut::<T>("d_base")?;
        let d_spline_s = d_spline.cuda_slice_mut::<T>("d_spline")?;
        let mut args = dev.stream().launch_builder(&func);
        args.arg(d_cat.cuda_slice::<T>("d_cat")?).arg(ws).arg(scaler).arg(&has_scaler).arg(d_base_s).arg(d_spline_s);
        match d_scaler.as_mut() {
            Some(t) => args.arg(t.cuda_slice_mut::<T>("d_scaler")?),
            None => args.arg(ws),
        };
        args.arg(&n32).arg(&nb32);
        // SAFETY: kan_split_grads_<T>(const T* d_cat, const T* w_spline, const T* scaler,
        // uint32_t has_scaler, T* d_base, T* d_spline, T* d_scaler, uint32_t n_oi, uint32_t
        // nb): d_cat holds n_oi * (1 + nb), w_spline and d_spline n_oi * nb, d_base n_oi; scaler
        // and d_scaler hold n_oi and are touched only when has_scaler = 1 (otherwise the
        // stand-in pointers are never dereferenced).
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching kan_split_grads", e))?;
    }
    Ok(KanGrads { dx, base_weight: d_base, spline_weight: d_spline, spline_scaler: d_scaler })
}
