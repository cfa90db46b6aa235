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

    /// Host memory for an allocation sized by the caller's argument `arg` cannot exist:
    /// reported before anything is allocated (see `crate::memory`).
    #[error("not enough host memory for `{arg}`: it needs {requested_bytes} bytes{}", available(*available_bytes))]
    HostOutOfMemory { arg: &'static str, requested_bytes: usize, available_bytes: Option<usize> },

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

    /// A safetensors file that could not be read or written: which file and what is wrong.
    #[error("safetensors file {path}: {problem}")]
    Safetensors { path: String, problem: String },

    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What is wrong, in words, for each way a safetensors file can be malformed.
pub(crate) fn describe_safetensors(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::InvalidHeader => "the header is not valid UTF-8".into(),
        E::InvalidHeaderStart => "the header does not start with `{` (not a safetensors file?)".into(),
        E::InvalidHeaderDeserialization => "the header is not the JSON a safetensors file holds".into(),
        E::HeaderTooLarge => "the header is larger than the 100 MB safetensors allows".into(),
        E::HeaderTooSmall => "the file is shorter than the 8-byte header length (not a safetensors file?)".into(),
        E::InvalidHeaderLength => "the header length is past the end of the file (truncated?)".into(),
        E::TensorNotFound(name) => format!("no tensor named `{name}`"),
        E::TensorInvalidInfo => "a tensor's shape, dtype and data offsets disagree".into(),
        E::InvalidOffset(name) => format!("the data offsets of tensor `{name}` are invalid (truncated?)"),
        E::IoError(io) => format!("i/o error: {io}"),
        E::JsonError(json) => format!("the header's JSON is invalid: {json}"),
        E::InvalidTensorView(dtype, shape, len) => {
            format!("a {dtype:?} tensor of shape {shape:?} cannot hold {len} bytes")
        }
        E::MetadataIncompleteBuffer => "the tensors' data offsets do not cover the data (truncated?)".into(),
        E::ValidationOverflow => "a tensor's size overflows".into(),
    }
}

fn free_total(free: Option<usize>, total: Option<usize>) -> String {
    match (free, total) {
        (Some(f), Some(t)) => format!(" ({f} of {t} bytes free)"),
        _ => String::new(),
    }
}

fn available(bytes: Option<usize>) -> String {
    match bytes {
        Some(b) => format!(" and the system has {b} bytes available (memory plus swap)"),
        None => " (more than any address space can hold)".to_string(),
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
        matches!(self, Error::OutOfMemory { .. } | Error::HostOutOfMemory { .. })
            || matches!(self, Error::Driver { source, .. } if source.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY)
    }
}
