//! # hybrid-kernels
//!
//! Hand-written CUDA kernels for the layers that hybrid sequence models mix, wrapped in a
//! safe API and checked against f64 CPU references:
//!
//! - [`ops::bspline`]: B-spline basis evaluation and its derivative for KAN layers
//!   (efficient-kan semantics).
//! - [`ops::kan`]: KANLinear forward, backward, grid update and regularization
//!   (efficient-kan semantics), on the basis kernel and cuBLAS.
//! - [`ops::selective_scan`]: Mamba's fused selective scan, forward, backward and the
//!   decoding step (mamba-ssm semantics).
//! - [`ops::causal_conv1d`]: the causal depthwise conv1d of Mamba blocks, forward, backward
//!   and the rolling-state decoding update (causal-conv1d semantics).
//! - [`ops::mlstm`]: xLSTM's mLSTM cell (mlstm_kernels' mLSTMexp), a chunkwise forward on
//!   tensor cores with exact max-state stabilisation, the decoding step, and the backward
//!   (exact, or with the normaliser held constant), on the GPU and the CPU.
//! - [`ops::norm`]: RMSNorm, LayerNorm, group norm and the fused residual add + norm, forward
//!   and backward (mamba-ssm's `layer_norm_fn` semantics).
//! - [`ops::spline_activation`]: a learnable per-channel B-spline activation (the
//!   "B-spline MLP"), forward and backward.
//!
//! Layers of the crate, dependencies pointing down only:
//!
//! - [`model`]: models assembled from layers (reserved);
//! - [`nn`]: layers with explicit forward, backward and step (reserved);
//! - [`ops`]: one folder per op, owning its API and validation, f64 CPU reference, launches,
//!   check cases, bench rows and CLI `run` commands; [`ops::registry`] lists them;
//! - core: [`tensor`], [`device`], [`dtype`], [`error`], [`kernels`] (the embedded modules and
//!   the kernel naming rule), [`memory`] (the host memory budget), [`rng`], [`measure`] (error measures and tolerances),
//!   [`timing`] (CUDA-event timing).
//!
//! [`check`] and [`bench`](mod@bench) drive the CLI's `check` and `bench` over the registry.
//!
//! Kernels are compiled to PTX at build time (or taken from the committed `ptx/` when no
//! nvcc is found) and embedded; they are loaded lazily, per device. Every op also runs
//! on [`Device::Cpu`], through its reference implementation.
//!
//! ```
//! use hybrid_kernels::{ops::bspline, DType, Device, Tensor};
//! # fn main() -> hybrid_kernels::Result<()> {
//! let device = Device::Cpu; // or Device::cuda(0)?
//! let grid = bspline::KnotGrid::uniform(4, 5, 3, (-1.0, 1.0), &device)?;
//! let x = Tensor::from_f32(&[0.1, -0.5, 0.9, 0.0, 0.3, 0.2, -0.7, 0.4], &[2, 4], DType::F32, &device)?;
//! let bases = bspline::bspline_basis(&x, &grid)?;
//! assert_eq!(bases.shape(), &[2, 4, 8]); // (batch, in, G + k)
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bench;
pub mod check;
pub mod device;
pub mod dtype;
pub mod error;
mod gemm;
pub mod kernels;
pub mod measure;
pub mod memory;
pub mod model;
pub mod nn;
pub mod ops;
pub mod rng;
pub mod tensor;
pub mod timing;
pub mod tokens;

pub use device::{CudaDevice, Device};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use tensor::{load_safetensors, save_safetensors, Tensor};
pub use tokens::TokenIds;
