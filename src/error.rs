//! The one error type of the crate. Every public function returns [`Result`]; bad
//! input is reported here, never by a panic.

use cudarc::driver::{sys::CUresult, DriverError};

/// What the committed PTX needs from the driver. Printed in [`Error::PtxTooNew`].
pub const COMMITTED_PTX_DRIVER: &str = "r580 or newer (CUDA 13.0; the committed PTX is ISA 9.0 from nvcc 13.0)";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `libcuda.so` could not be loaded. Probed before any driver call, because
    /// the driver bindings abort the process when the library is missing.
    #[error(
        "CUDA driver library not found (looked for libcuda.so / libcuda.so.1 on the loader path): \
         no NVIDIA driver is installed, or LD_LIBRARY_PATH does not reach it; the CPU path \
         (Device::Cpu) still works"
    )]
    DriverNotFound,

    #[error("no CUDA device with ordinal {ordinal}: the driver reports {count} device(s)")]
    NoDevice { ordinal: usize, count: usize },

    #[error(
        "kernel module `{module}` is built for compute capability {}.{} (or newer, unless its target is \
         architecture-specific like sm_90a); device {ordinal} has {}.{}",
        required.0, required.1, found.0, found.1
    )]
    UnsupportedComputeCapability { module: &'static str, ordinal: usize, required: (i32, i32), found: (i32, i32) },

    #[error(
        "the driver cannot load kernel module `{module}` (PTX ISA {ptx_isa}): its PTX is newer than \
         the installed driver supports (driver API {driver_version}). The committed PTX needs driver \
         {committed}. Update the NVIDIA driver, or rebuild the PTX with an nvcc no newer than your \
         driver: HYBRID_KERNELS_NVCC=/path/to/nvcc cargo build --release (see README, \
         'Rebuilding the PTX')",
        committed = COMMITTED_PTX_DRIVER
    )]
    PtxTooNew { module: &'static str, ptx_isa: String, driver_version: String },

    #[error("out of device memory: asked for {requested_bytes} bytes on device {ordinal}{}", free_total(*free_bytes, *total_bytes))]
    OutOfMemory { ordinal: usize, requested_bytes: usize, free_bytes: Option<usize>, total_bytes: Option<usize> },

    /// A shape, length or value of argument `arg` is not what the operation needs.
    #[error("invalid `{arg}`: expected {expected}, found {found}")]
    InvalidArgument { arg: &'static str, expected: String, found: String },

    #[error("wrong element type for `{arg}`: expected {expected}, found {found}")]
    DTypeMismatch { arg: &'static str, expected: String, found: String },

    #[error("`{arg}` is on {found}, expected {expected}")]
    DeviceMismatch { arg: &'static str, expected: String, found: String },

    #[error("`{arg}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite { arg: &'static str, index: usize, value: f64 },

    #[error("CUDA driver error in {context}: {source}")]
    Driver {
        context: &'static str,
        #[source]
        source: DriverError,
    },

    #[error(
        "{library} library not found (looked for {looked_for} on the loader path); it ships with the \
         CUDA toolkit and with PyTorch's CUDA wheels: add its folder to LD_LIBRARY_PATH, or create a \
         `{looked_for}` link to the versioned file"
    )]
    LibraryNotFound { library: &'static str, looked_for: &'static str },

    #[error("cuBLAS error in {context}: {source}")]
    Cublas {
        context: &'static str,
        #[source]
        source: cudarc::cublas::result::CublasError,
    },

    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),

    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn free_total(free: Option<usize>, total: Option<usize>) -> String {
    match (free, total) {
        (Some(f), Some(t)) => format!(" ({f} of {t} bytes free)"),
        _ => String::new(),
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn invalid(arg: &'static str, expected: impl Into<String>, found: impl Into<String>) -> Self {
        Error::InvalidArgument { arg, expected: expected.into(), found: found.into() }
    }

    /// Wraps a driver error, turning out-of-memory into [`Error::OutOfMemory`].
    pub(crate) fn driver(context: &'static str, source: DriverError) -> Self {
        Error::Driver { context, source }
    }

    /// True when the driver said it ran out of memory (allocation, launch resources).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::OutOfMemory { .. })
            || matches!(self, Error::Driver { source, .. } if source.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY)
    }
}
