//! Launches of `cuda/bspline.cu`. All validation happened in `super`; this file only
//! splits the work into launches of fewer than 2^32 elements and launches them.

use super::{BasisDims, BasisKind, KnotGrid};
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{kernel_name, KernelModule};
use crate::tensor::{CudaData, Storage, Tensor};
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

/// Mirrors `hk_bspline::BsplineParams` (cuda/bspline_device.cuh), the parameters of every
/// kernel built on its row tiles (the basis kernels here, `kan_features`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BsplineParams {
    pub n_rows: u32,
    pub in_features: u32,
    pub n_knots: u32,
    pub order: u32,
    pub uniform: u32,
}
crate::kernels::assert_kernel_params!(BsplineParams, 5);

// SAFETY: five u32 fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for BsplineParams {}

/// 8 warps of 32 rows each (WARPS_PER_BLOCK, ROWS_PER_WARP in cuda/bspline.cu).
const BLOCK_THREADS: u32 = 256;
const ROWS_PER_BLOCK: usize = 256;
/// Rows per launch: row indices stay well inside u32 in the kernel.
const MAX_ROWS_PER_LAUNCH: usize = 1 << 31;

/// `bspline_basis_<dtype>` or `bspline_basis_derivative_<dtype>`.
fn basis_kernel(kind: BasisKind, dtype: DType) -> String {
    let variant = match kind {
        BasisKind::Value => "basis",
        BasisKind::Derivative => "basis_derivative",
    };
    kernel_name("bspline", variant, dtype, "")
}

/// An output tensor whose every element the following launch writes.
pub(super) fn alloc_output(dev: &CudaDevice, dtype: DType, shape: Vec<usize>) -> Result<Tensor> {
    // SAFETY: evaluate_into, called right after by the only caller, launches the kernel
    // that writes every element before the tensor is handed out.
    unsafe { Tensor::cuda_uninit(dev, dtype, &shape) }
}

pub(super) fn evaluate_into(
    kind: BasisKind,
    dev: &CudaDevice,
    x: &Tensor,
    grid: &KnotGrid,
    dims: BasisDims,
    out: &mut Tensor,
) -> Result<()> {
    let not_on_device =
        |arg| Error::DeviceMismatch { arg, expected: format!("cuda:{}", dev.ordinal()), found: "cpu".into() };
    let Storage::Cuda(_, xd) = x.storage() else { return Err(not_on_device("x")) };
    let Storage::Cuda(_, CudaData::F32(knots)) = grid.knots().storage() else { return Err(not_on_device("grid")) };
    let Storage::Cuda(_, od) = out.storage_mut() else { return Err(not_on_device("out")) };
    if dims.rows == 0 {
        return Ok(());
    }
    let name = basis_kernel(kind, x.dtype());
    let func = dev.function(KernelModule::Bspline, &name)?;
    // Each launch covers whole batch rows and at most 2^31 rows (32-bit row indices).
    if dims.in_features > MAX_ROWS_PER_LAUNCH {
        return Err(Error::invalid(
            "x",
            format!("in_features <= {MAX_ROWS_PER_LAUNCH}"),
            format!("in_features = {}", dims.in_features),
        ));
    }
    let batch_rows = dims.rows / dims.in_features;
    let batch_rows_per_launch = MAX_ROWS_PER_LAUNCH / dims.in_features;
    for b0 in (0..batch_rows).step_by(batch_rows_per_launch) {
        let b1 = (b0 + batch_rows_per_launch).min(batch_rows);
        let (r0, r1) = (b0 * dims.in_features, b1 * dims.in_features);
        let nb = dims.n_bases;
        let params = BsplineParams {
            n_rows: (r1 - r0) as u32,
            in_features: dims.in_features as u32,
            n_knots: dims.n_knots as u32,
            order: dims.order as u32,
            uniform: u32::from(grid.is_uniform()),
        };
        // At most one wave of resident blocks; the kernel's grid-stride loop covers the rest.
        let cfg = dev.grid_stride_config(KernelModule::Bspline, &name, BLOCK_THREADS, r1 - r0, ROWS_PER_BLOCK)?;
        match (xd, &mut *od) {
            (CudaData::F32(xs), CudaData::F32(os)) => {
                launch(dev, &func, xs.slice(r0..r1), knots, os.slice_mut(r0 * nb..r1 * nb), params, cfg)?
            }
            (CudaData::BF16(xs), CudaData::BF16(os)) => {
                launch(dev, &func, xs.slice(r0..r1), knots, os.slice_mut(r0 * nb..r1 * nb), params, cfg)?
            }
            (CudaData::F16(xs), CudaData::F16(os)) => {
                launch(dev, &func, xs.slice(r0..r1), knots, os.slice_mut(r0 * nb..r1 * nb), params, cfg)?
            }
            _ => {
                return Err(Error::DTypeMismatch {
                    arg: "out",
                    expected: x.dtype().to_string(),
                    found: od.dtype().to_string(),
                })
            }
        }
    }
    Ok(())
}

fn launch<T>(
    dev: &CudaDevice,
    func: &CudaFunction,
    x: CudaView<'_, T>,
    knots: &CudaSlice<f32>,
    mut out: CudaViewMut<'_, T>,
    params: BsplineParams,
    cfg: LaunchConfig,
) -> Result<()> {
    let mut args = dev.stream().launch_builder(func);
    args.arg(&x).arg(knots).arg(&mut out).arg(&params);
    // SAFETY: the arguments match `bspline_*_<dtype>(const T*, const float*, T*,
    // BsplineParams)` in cuda/bspline.cu, with T the element type of both x and out.
    // Sizes were checked before: x holds n_rows values, out n_rows * n_bases, knots
    // in_features * n_knots (KnotGrid, n_knots >= order + 2), and order <=
    // MAX_SPLINE_ORDER. The kernel reads x[row] and writes out[row * n_bases + j] for
    // row < n_rows, j < n_bases only, and clamps every knot index into its feature's row.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching a B-spline kernel", e))?;
    Ok(())
}
