//! The KANLinear GPU pipeline: `cuda/kan.cu` kernels, the B-spline basis kernel and cuBLAS.

use super::{KanGrads, KanLinear};
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gemm::{gemm, GemmShape, Layout};
use crate::kernels::KernelModule;
use crate::ops::bspline;
use crate::tensor::{CudaElement, Tensor};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// Mirrors `hk_kan::InputGradParams` in cuda/kan.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct InputGradParams {
    n_rows: u32,
    in_features: u32,
    n_knots: u32,
    order: u32,
}

// SAFETY: four u32 fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for InputGradParams {}

const BLOCK_THREADS: u32 = 256;

#[derive(Clone, Copy)]
enum Kernel {
    Silu,
    ScaleSpline,
    SplineWeightGrads,
    InputGrad,
}

fn name(kernel: Kernel, dtype: DType) -> &'static str {
    use {DType::*, Kernel::*};
    match (kernel, dtype) {
        (Silu, F32) => "kan_silu_f32",
        (Silu, BF16) => "kan_silu_bf16",
        (Silu, F16) => "kan_silu_f16",
        (ScaleSpline, F32) => "kan_scale_spline_f32",
        (ScaleSpline, BF16) => "kan_scale_spline_bf16",
        (ScaleSpline, F16) => "kan_scale_spline_f16",
        (SplineWeightGrads, F32) => "kan_spline_weight_grads_f32",
        (SplineWeightGrads, BF16) => "kan_spline_weight_grads_bf16",
        (SplineWeightGrads, F16) => "kan_spline_weight_grads_f16",
        (InputGrad, F32) => "kan_input_grad_f32",
        (InputGrad, BF16) => "kan_input_grad_bf16",
        (InputGrad, F16) => "kan_input_grad_f16",
    }
}

/// A grid-stride launch over `n` items, one wave of resident blocks at most.
fn config(dev: &CudaDevice, kernel: &'static str, n: usize) -> Result<LaunchConfig> {
    let resident = dev.resident_blocks(KernelModule::Kan, kernel, BLOCK_THREADS)?;
    let blocks = (n.div_ceil(BLOCK_THREADS as usize).max(1) as u64).min(resident as u64) as u32;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK_THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// Row and feature counts of one call, checked against the kernels' 32-bit indices.
#[derive(Clone, Copy)]
struct Sizes {
    rows: usize,
    inf: usize,
    outf: usize,
    nb: usize,
}

fn sizes(layer: &KanLinear, rows: usize) -> Result<Sizes> {
    let c = layer.config();
    let s = Sizes { rows, inf: c.in_features, outf: c.out_features, nb: c.n_bases() };
    let elements = rows.checked_mul(s.inf);
    if elements.is_none_or(|e| e > u32::MAX as usize) {
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

/// The GEMM inputs of both passes: SiLU(x) (rows x in), the bases (rows x in*nb) and the
/// scaled spline weights (out x in*nb; the spline weights themselves without a scaler).
struct Features {
    silu: Tensor,
    bases: Tensor,
    scaled: Option<Tensor>,
}

fn features<T: CudaElement>(layer: &KanLinear, dev: &CudaDevice, x: &Tensor, s: Sizes) -> Result<Features> {
    let dtype = T::DTYPE;
    let x2 = x.clone().reshape(&[s.rows, s.inf])?;
    // SAFETY (allocation): kan_silu below writes all rows * in elements.
    let mut silu = unsafe { Tensor::cuda_uninit(dev, dtype, &[s.rows, s.inf])? };
    let n = s.rows * s.inf;
    if n > 0 {
        let kernel = name(Kernel::Silu, dtype);
        let f = dev.function(KernelModule::Kan, kernel)?;
        let cfg = config(dev, kernel, n)?;
        let n64 = n as u64;
        let xs = x2.cuda_slice::<T>("x")?;
        let out = silu.cuda_slice_mut::<T>("silu")?;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(xs).arg(out).arg(&n64);
        // SAFETY: kan_silu_<T>(const T* x, T* out, uint64_t n): x and out both hold n elements.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching kan_silu", e))?;
    }
    let bases = bspline::bspline_basis(&x2, layer.grid())?;
    let scaled = match layer.spline_scaler() {
        None => None,
        Some(scaler) => {
            let total = s.outf * s.inf * s.nb;
            // SAFETY (allocation): kan_scale_spline below writes all out * in * nb elements.
            let mut scaled = unsafe { Tensor::cuda_uninit(dev, dtype, &[s.outf, s.inf * s.nb])? };
            let kernel = name(Kernel::ScaleSpline, dtype);
            let f = dev.function(KernelModule::Kan, kernel)?;
            let cfg = config(dev, kernel, total)?;
            let (n64, nb32) = (total as u64, s.nb as u32);
            let w = layer.spline_weight().cuda_slice::<T>("spline_weight")?;
            let sc = scaler.cuda_slice::<T>("spline_scaler")?;
            let out = scaled.cuda_slice_mut::<T>("scaled")?;
            let mut args = dev.stream().launch_builder(&f);
            args.arg(w).arg(sc).arg(out).arg(&n64).arg(&nb32);
            // SAFETY: kan_scale_spline_<T>(const T* w, const T* scaler, T* out, uint64_t n,
            // uint32_t nb): w and out hold n = out*in*nb elements, scaler n / nb = out*in.
            unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching kan_scale_spline", e))?;
            Some(scaled)
        }
    };
    Ok(Features { silu, bases, scaled })
}

fn spline_matrix<'a, T: CudaElement>(layer: &'a KanLinear, scaled: &'a Option<Tensor>) -> Result<&'a CudaSlice<T>> {
    match scaled {
        Some(t) => t.cuda_slice::<T>("scaled spline weights"),
        None => layer.spline_weight().cuda_slice::<T>("spline_weight"),
    }
}

fn forward_typed<T: CudaElement>(
    layer: &KanLinear,
    dev: &CudaDevice,
    x: &Tensor,
    s: Sizes,
    out_shape: &[usize],
) -> Result<Tensor> {
    let f = features::<T>(layer, dev, x, s)?;
    // SAFETY (allocation): the first GEMM (beta = 0) writes all rows * out elements.
    let mut y = unsafe { Tensor::cuda_uninit(dev, T::DTYPE, &[s.rows, s.outf])? };
    let tf32 = layer.allow_tf32();
    {
        let yc = y.cuda_slice_mut::<T>("y")?;
        let wb = layer.base_weight().cuda_slice::<T>("base_weight")?;
        let silu = f.silu.cuda_slice::<T>("silu")?;
        // y = SiLU(x) W_base^T
        gemm(
            dev,
            GemmShape { m: s.rows, n: s.outf, k: s.inf },
            1.0,
            silu,
            Layout::AsIs,
            wb,
            Layout::Transposed,
            0.0,
            yc,
            tf32,
        )?;
        // y += B(x)_flat (W_spline * scaler)^T
        let bases = f.bases.cuda_slice::<T>("bases")?;
        let ws = spline_matrix::<T>(layer, &f.scaled)?;
        gemm(
            dev,
            GemmShape { m: s.rows, n: s.outf, k: s.inf * s.nb },
            1.0,
            bases,
            Layout::AsIs,
            ws,
            Layout::Transposed,
            1.0,
            yc,
            tf32,
        )?;
    }
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
    let Features { mut silu, mut bases, scaled } = features::<T>(layer, dev, x, s)?;
    let dy2 = dy.clone().reshape(&[s.rows, s.outf])?;
    let dys = dy2.cuda_slice::<T>("dy")?;
    // SAFETY (allocations): each is written in full by the GEMM or kernel named with it
    // (GEMMs with beta = 0 write every element of C).
    let mut d_base = unsafe { Tensor::cuda_uninit(dev, dtype, &[s.outf, s.inf])? }; // GEMM 1
    let mut d_scaled = unsafe { Tensor::cuda_uninit(dev, dtype, &[s.outf, s.inf, s.nb])? }; // GEMM 2
    let mut dx = unsafe { Tensor::cuda_uninit(dev, dtype, &[s.rows, s.inf])? }; // kan_input_grad

    // Weight gradients first, while SiLU(x) and the bases are still in their buffers.
    {
        let silu_s = silu.cuda_slice::<T>("silu")?;
        let bases_s = bases.cuda_slice::<T>("bases")?;
        gemm(
            dev,
            GemmShape { m: s.outf, n: s.inf, k: s.rows },
            1.0,
            dys,
            Layout::Transposed,
            silu_s,
            Layout::AsIs,
            0.0,
            d_base.cuda_slice_mut::<T>("d_base")?,
            tf32,
        )?;
        gemm(
            dev,
            GemmShape { m: s.outf, n: s.inf * s.nb, k: s.rows },
            1.0,
            dys,
            Layout::Transposed,
            bases_s,
            Layout::AsIs,
            0.0,
            d_scaled.cuda_slice_mut::<T>("d_scaled")?,
            tf32,
        )?;
    }
    // Input-side gradients overwrite those buffers: dSiLU = dy W_base, dB = dy (W_spline * scaler).
    {
        let ws = spline_matrix::<T>(layer, &scaled)?;
        let wb = layer.base_weight().cuda_slice::<T>("base_weight")?;
        gemm(
            dev,
            GemmShape { m: s.rows, n: s.inf, k: s.outf },
            1.0,
            dys,
            Layout::AsIs,
            wb,
            Layout::AsIs,
            0.0,
            silu.cuda_slice_mut::<T>("d_silu")?,
            tf32,
        )?;
        gemm(
            dev,
            GemmShape { m: s.rows, n: s.inf * s.nb, k: s.outf },
            1.0,
            dys,
            Layout::AsIs,
            ws,
            Layout::AsIs,
            0.0,
            bases.cuda_slice_mut::<T>("d_bases")?,
            tf32,
        )?;
    }
    if s.rows * s.inf > 0 {
        let kernel = name(Kernel::InputGrad, dtype);
        let func = dev.function(KernelModule::Kan, kernel)?;
        let cfg = config(dev, kernel, s.rows * s.inf)?;
        let grid = layer.grid();
        let params = InputGradParams {
            n_rows: (s.rows * s.inf) as u32,
            in_features: s.inf as u32,
            n_knots: grid.n_knots() as u32,
            order: grid.order() as u32,
        };
        let x2 = x.clone().reshape(&[s.rows, s.inf])?;
        let knots = grid.knots().cuda_slice::<f32>("grid")?;
        let mut args = dev.stream().launch_builder(&func);
        args.arg(x2.cuda_slice::<T>("x")?)
            .arg(knots)
            .arg(silu.cuda_slice::<T>("d_silu")?)
            .arg(bases.cuda_slice::<T>("d_bases")?)
            .arg(dx.cuda_slice_mut::<T>("dx")?)
            .arg(&params);
        // SAFETY: kan_input_grad_<T>(const T* x, const float* grid, const T* d_silu,
        // const T* d_bases, T* dx, InputGradParams): x, d_silu and dx hold n_rows = rows*in
        // elements, d_bases n_rows * nb, grid in * n_knots (KnotGrid, order <= 7); the kernel
        // reads d_bases only at row * nb + j for j < nb and clamps knot indices to the row.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching kan_input_grad", e))?;
    }
    let dx = dx.reshape(x.shape())?;
    let (spline_weight, spline_scaler) = match layer.spline_scaler() {
        None => (d_scaled, None),
        Some(scaler) => {
            let n_oi = s.outf * s.inf;
            // SAFETY (allocations): kan_spline_weight_grads writes all of d_w and d_scaler.
            let mut d_w = unsafe { Tensor::cuda_uninit(dev, dtype, &[s.outf, s.inf, s.nb])? };
            let mut d_s = unsafe { Tensor::cuda_uninit(dev, dtype, &[s.outf, s.inf])? };
            let kernel = name(Kernel::SplineWeightGrads, dtype);
            let func = dev.function(KernelModule::Kan, kernel)?;
            let cfg = config(dev, kernel, n_oi)?;
            let (n32, nb32) = (n_oi as u32, s.nb as u32);
            let mut args = dev.stream().launch_builder(&func);
            args.arg(d_scaled.cuda_slice::<T>("d_scaled")?)
                .arg(layer.spline_weight().cuda_slice::<T>("spline_weight")?)
                .arg(scaler.cuda_slice::<T>("spline_scaler")?)
                .arg(d_w.cuda_slice_mut::<T>("d_spline_weight")?)
                .arg(d_s.cuda_slice_mut::<T>("d_spline_scaler")?)
                .arg(&n32)
                .arg(&nb32);
            // SAFETY: kan_spline_weight_grads_<T>(const T* d_scaled, const T* w, const T*
            // scaler, T* d_w, T* d_scaler, uint32_t n_oi, uint32_t nb): d_scaled, w and d_w
            // hold n_oi * nb elements, scaler and d_scaler n_oi (shapes checked by the layer).
            unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching kan_spline_weight_grads", e))?;
            (d_w, Some(d_s))
        }
    };
    Ok(KanGrads { dx, base_weight: d_base, spline_weight, spline_scaler })
}
