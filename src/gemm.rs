//! Row-major matrix products on the device through cuBLAS: `C = alpha op(A) op(B) + beta C`
//! with f32 accumulation for every element type; f32 inputs may opt into TF32 tensor cores.
//!
//! cuBLAS is column-major: a row-major (r x c) matrix is its column-major (c x r)
//! transpose, so the row-major `C = op(A) op(B)` is computed as the column-major
//! `C^T = op(B)^T op(A)^T` (B first).

use crate::device::CudaDevice;
use crate::error::{Error, Result};
use crate::tensor::CudaElement;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::ffi::c_int;

/// How an operand is stored relative to its role in the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Stored as used: op(A) = A, (m x k) row-major.
    AsIs,
    /// Stored transposed: op(A) = stored^T, the stored matrix is (k x m) row-major.
    Transposed,
}

/// The sizes of one product: op(A) is (m x k), op(B) is (k x n), C is (m x n).
#[derive(Clone, Copy, Debug)]
pub(crate) struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

fn dim(arg: &'static str, v: usize) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| Error::invalid(arg, "a matrix dimension below 2^31 (cuBLAS)", v.to_string()))
}

fn data_type<T: CudaElement>() -> cudaDataType {
    match T::DTYPE {
        crate::DType::F32 => cudaDataType::CUDA_R_32F,
        crate::DType::BF16 => cudaDataType::CUDA_R_16BF,
        crate::DType::F16 => cudaDataType::CUDA_R_16F,
    }
}

/// Row-major `c = alpha op(a) op(b) + beta c`. Sizes are checked against the slices.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: CudaElement>(
    dev: &CudaDevice,
    shape: GemmShape,
    alpha: f32,
    a: &CudaSlice<T>,
    a_layout: Layout,
    b: &CudaSlice<T>,
    b_layout: Layout,
    beta: f32,
    c: &mut CudaSlice<T>,
    allow_tf32: bool,
) -> Result<()> {
    let GemmShape { m, n, k } = shape;
    let need = |arg: &'static str, len: usize, want: usize| {
        if len < want {
            Err(Error::invalid(arg, format!("at least {want} elements for a {m}x{n}x{k} product"), format!("{len}")))
        } else {
            Ok(())
        }
    };
    need("a", a.len(), m * k)?;
    need("b", b.len(), k * n)?;
    need("c", c.len(), m * n)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (mi, ni, ki) = (dim("m", m)?, dim("n", n)?, dim("k", k)?);
    // Column-major C^T (n x m) = op(B)^T (n x k) . op(A)^T (k x m).
    let (op_b, ld_b) = match b_layout {
        Layout::AsIs => (cublasOperation_t::CUBLAS_OP_N, ni),
        Layout::Transposed => (cublasOperation_t::CUBLAS_OP_T, ki),
    };
    let (op_a, ld_a) = match a_layout {
        Layout::AsIs => (cublasOperation_t::CUBLAS_OP_N, ki),
        Layout::Transposed => (cublasOperation_t::CUBLAS_OP_T, mi),
    };
    let compute = if allow_tf32 && T::DTYPE == crate::DType::F32 {
        cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let blas = dev.blas()?;
    let stream = dev.stream();
    let (pa, _ra) = a.device_ptr(stream);
    let (pb, _rb) = b.device_ptr(stream);
    let (pc, _rc) = c.device_ptr_mut(stream);
    let ty = data_type::<T>();
    // SAFETY: the handle is bound to `stream`, where the pointers are valid (the records
    // keep the slices ordered with other work). Each operand holds at least the
    // elements its (rows x leading dimension) extent covers, checked above: a >= m*k,
    // b >= k*n, c >= m*n, with the leading dimensions equal to the row lengths of the
    // row-major storage. alpha and beta are f32, as CUBLAS_COMPUTE_32F* requires.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op_b,
            op_a,
            ni,
            mi,
            ki,
            (&alpha) as *const f32 as *const _,
            pb as *const _,
            ty,
            ld_b,
            pa as *const _,
            ty,
            ld_a,
            (&beta) as *const f32 as *const _,
            pc as *mut _,
            ty,
            ni,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| Error::Cublas { context: "cublasGemmEx", source: e })
}
