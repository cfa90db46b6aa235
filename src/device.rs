//! Where tensors live and kernels run: the CPU (the f64 reference implementations) or
//! one CUDA device, which owns its context, one stream and the kernel modules it has
//! loaded (lazily, once each).

use crate::error::{Error, Result};
use crate::kernels::KernelModule;
use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

/// A place for tensors and computation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU: every op runs its f64-accumulating reference implementation.
    Cpu,
    Cuda(CudaDevice),
}

impl Device {
    /// Opens CUDA device `ordinal`. Fails with a typed error, never a panic, when the
    /// driver library is missing, the ordinal does not exist or the driver fails.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        CudaDevice::new(ordinal).map(Device::Cuda)
    }

    /// CUDA device 0 when one can be opened, else the CPU together with the reason.
    pub fn cuda_or_cpu() -> (Device, Option<Error>) {
        match Device::cuda(0) {
            Ok(d) => (d, None),
            Err(e) => (Device::Cpu, Some(e)),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    pub fn as_cuda(&self) -> Option<&CudaDevice> {
        match self {
            Device::Cuda(d) => Some(d),
            Device::Cpu => None,
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(d) => write!(f, "cuda:{}", d.ordinal()),
        }
    }
}

/// True when the CUDA driver library can be loaded. Cheap after the first call.
pub fn driver_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only dlopen()s candidate library names; calls no CUDA function.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// Initialises the driver once; every driver call in the crate goes through here first.
fn init_driver() -> Result<()> {
    if !driver_available() {
        return Err(Error::DriverNotFound);
    }
    static INIT: OnceLock<std::result::Result<(), DriverError>> = OnceLock::new();
    (*INIT.get_or_init(cudarc::driver::result::init)).map_err(|e| Error::driver("cuInit", e))
}

/// Number of CUDA devices (0 when the driver reports none).
pub fn cuda_device_count() -> Result<usize> {
    init_driver()?;
    match CudaContext::device_count() {
        Ok(n) => Ok(n.max(0) as usize),
        Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => Ok(0),
        Err(e) => Err(Error::driver("cuDeviceGetCount", e)),
    }
}

/// The CUDA version the installed driver supports, as `major.minor` (e.g. "13.0").
pub fn driver_version() -> Result<String> {
    init_driver()?;
    let mut v: std::ffi::c_int = 0;
    // SAFETY: the driver library is loaded and initialised (init_driver); `v` is a
    // valid out-pointer for the duration of the call.
    unsafe { sys::cuDriverGetVersion(&mut v) }.result().map_err(|e| Error::driver("cuDriverGetVersion", e))?;
    Ok(format!("{}.{}", v / 1000, (v % 1000) / 10))
}

/// An open CUDA device: context, one stream, and the modules loaded on it so far.
/// Cloning shares all of it.
#[derive(Clone)]
pub struct CudaDevice(Arc<CudaDeviceInner>);

struct CudaDeviceInner {
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    multiprocessors: u32,
    max_shared_per_block: usize,
    total_memory: usize,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<KernelModule, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(KernelModule, String), CudaFunction>>,
    resident_blocks: Mutex<HashMap<(KernelModule, String, u32), u32>>,
    blas: Mutex<Option<Arc<cudarc::cublas::CudaBlas>>>,
}

impl PartialEq for CudaDevice {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for CudaDevice {}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ma, mi) = self.0.compute_capability;
        write!(f, "CudaDevice({}: {}, sm_{ma}{mi})", self.0.ordinal, self.0.name)
    }
}

impl CudaDevice {
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        let count = cuda_device_count()?;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::driver("creating the CUDA context", e))?;
        let attr = |a: sys::CUdevice_attribute| ctx.attribute(a).map_err(|e| Error::driver("cuDeviceGetAttribute", e));
        use sys::CUdevice_attribute::*;
        let compute_capability =
            (attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?);
        let multiprocessors = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        let max_shared_per_block = attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(0) as usize;
        let name = ctx.name().map_err(|e| Error::driver("cuDeviceGetName", e))?;
        let stream = ctx.new_stream().map_err(|e| Error::driver("creating a stream", e))?;
        let (_, total_memory) = ctx.mem_get_info().map_err(|e| Error::driver("cuMemGetInfo", e))?;
        Ok(CudaDevice(Arc::new(CudaDeviceInner {
            ordinal,
            name,
            compute_capability,
            multiprocessors,
            max_shared_per_block,
            total_memory,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            resident_blocks: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
        })))
    }

    pub fn ordinal(&self) -> usize {
        self.0.ordinal
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.0.compute_capability
    }

    pub fn multiprocessors(&self) -> u32 {
        self.0.multiprocessors
    }

    /// The most shared memory one block may ask for (bytes, after opting in).
    pub fn max_shared_memory_per_block(&self) -> usize {
        self.0.max_shared_per_block
    }

    /// The stream every operation on this device is queued on, in order.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.0.stream
    }

    /// The device's memory in bytes (read once, when the device was opened).
    pub fn total_memory(&self) -> usize {
        self.0.total_memory
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.0.stream.context().mem_get_info().map_err(|e| Error::driver("cuMemGetInfo", e))
    }

    /// Bytes in use from the device's default memory pool (where this crate allocates):
    /// (now, highest since the last [`CudaDevice::reset_pool_peak`]).
    pub fn pool_usage(&self) -> Result<(u64, u64)> {
        let pool = self.default_pool()?;
        let read = |attr| -> Result<u64> {
            let mut v: u64 = 0;
            // SAFETY: `pool` is the device's default pool; these attributes are u64 values
            // and `v` is a valid u64 out-pointer.
            unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut v) as *mut u64 as *mut _) }
                .result()
                .map_err(|e| Error::driver("cuMemPoolGetAttribute", e))?;
            Ok(v)
        };
        use sys::CUmemPool_attribute::*;
        Ok((read(CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?, read(CU_MEMPOOL_ATTR_USED_MEM_HIGH)?))
    }

    /// Resets the high-water mark of [`CudaDevice::pool_usage`] (after synchronizing).
    pub fn reset_pool_peak(&self) -> Result<()> {
        self.synchronize()?;
        let pool = self.default_pool()?;
        let mut zero: u64 = 0;
        // SAFETY: USED_MEM_HIGH may only be reset to zero, with a u64 value pointer.
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero) as *mut u64 as *mut _,
            )
        }
        .result()
        .map_err(|e| Error::driver("cuMemPoolSetAttribute", e))
    }

    fn default_pool(&self) -> Result<sys::CUmemoryPool> {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let dev = self.0.stream.context().cu_device();
        // SAFETY: `dev` is this context's device handle and `pool` a valid out-pointer.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, dev) }
            .result()
            .map_err(|e| Error::driver("cuDeviceGetDefaultMemPool", e))?;
        Ok(pool)
    }

    /// Waits for all work queued on the device's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.0.stream.synchronize().map_err(|e| self.map_err("synchronizing the stream", e))
    }

    /// Loads (once) and returns kernel `name` of `module`, checking the compute
    /// capability first and explaining a PTX that the driver is too old for.
    pub fn function(&self, module: KernelModule, name: &str) -> Result<CudaFunction> {
        let key = (module, name.to_string());
        if let Some(f) = lock(&self.0.functions).get(&key) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m.load_function(name).map_err(|e| Error::driver("cuModuleGetFunction", e))?;
        lock(&self.0.functions).insert(key, f.clone());
        Ok(f)
    }

    /// Blocks of `block_threads` threads of kernel `name` that fit on the whole device at
    /// once (occupancy per SM x SMs, at least one per SM): the grid of a grid-stride
    /// kernel that runs in exactly one wave.
    pub fn resident_blocks(&self, module: KernelModule, name: &str, block_threads: u32) -> Result<u32> {
        let key = (module, name.to_string(), block_threads);
        if let Some(&n) = lock(&self.0.resident_blocks).get(&key) {
            return Ok(n);
        }
        let per_sm = self
            .function(module, name)?
            .occupancy_max_active_blocks_per_multiprocessor(block_threads, 0, None)
            .map_err(|e| Error::driver("cuOccupancyMaxActiveBlocksPerMultiprocessor", e))?;
        let n = per_sm.max(1) * self.0.multiprocessors;
        lock(&self.0.resident_blocks).insert(key, n);
        Ok(n)
    }

    /// The device's cuBLAS handle, bound to its stream; created on first use. The library
    /// is probed first: the bindings abort the process when it is missing.
    pub(crate) fn blas(&self) -> Result<Arc<cudarc::cublas::CudaBlas>> {
        let mut slot = lock(&self.0.blas);
        if let Some(b) = slot.as_ref() {
            return Ok(b.clone());
        }
        // SAFETY: only dlopen()s candidate library names; calls no cuBLAS function.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::LibraryNotFound { library: "cuBLAS", looked_for: "libcublas.so" });
        }
        let blas = cudarc::cublas::CudaBlas::new(self.0.stream.clone())
            .map_err(|e| Error::Cublas { context: "creating the cuBLAS handle", source: e })?;
        let blas = Arc::new(blas);
        *slot = Some(blas.clone());
        Ok(blas)
    }

    /// The launch of a grid-stride kernel over `items` work items, `items_per_block` per
    /// block of `block_threads` threads: enough blocks for the items, at most one wave of
    /// resident blocks ([`CudaDevice::resident_blocks`]).
    pub(crate) fn grid_stride_config(
        &self,
        module: KernelModule,
        name: &str,
        block_threads: u32,
        items: usize,
        items_per_block: usize,
    ) -> Result<cudarc::driver::LaunchConfig> {
        let resident = self.resident_blocks(module, name, block_threads)?;
        let blocks = (items.div_ceil(items_per_block).max(1) as u64).min(resident as u64) as u32;
        Ok(cudarc::driver::LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (block_threads, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// Whether `module`'s kernels on this device are its compute_90 build, which the host
    /// may launch with programmatic stream serialization ([`CudaDevice::launch_raw`]).
    pub(crate) fn programmatic_launch(&self, module: KernelModule) -> bool {
        module.programmatic_launch(self.0.compute_capability)
    }

    /// Launches `f` on the device's stream from raw parameter pointers. With `programmatic`,
    /// the launch carries programmatic stream serialization: the grid may start before the
    /// previous kernel in the stream has finished (once all of that kernel's blocks have
    /// executed `griddepcontrol.launch_dependents` or exited); without it the launch is
    /// plainly stream-ordered. `context` names the launch in an error.
    ///
    /// # Safety
    /// As for any kernel launch: `params` holds one pointer per kernel parameter, each to a
    /// value of that parameter's exact C type, and every buffer is large enough for what the
    /// kernel reads and writes with this configuration. With `programmatic`, the kernel must
    /// also execute `griddepcontrol.wait` before it reads or writes global memory that the
    /// previous kernel writes, or writes memory that kernel reads, and `f` must come from a
    /// module for which [`CudaDevice::programmatic_launch`] is true.
    pub(crate) unsafe fn launch_raw(
        &self,
        f: &CudaFunction,
        cfg: cudarc::driver::LaunchConfig,
        params: &mut [*mut std::ffi::c_void],
        programmatic: bool,
        context: &'static str,
    ) -> Result<()> {
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue { programmaticStreamSerializationAllowed: 1 },
        };
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.0.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(programmatic),
        };
        self.0.stream.context().bind_to_thread().map_err(|e| self.map_err("binding the context", e))?;
        // SAFETY: config and attr outlive the call; the caller vouches for f and params.
        unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|e| self.map_err(context, e))
    }

    /// Loads every embedded module, so that problems show up front (used by `info`).
    pub fn load_all_modules(&self) -> Result<()> {
        KernelModule::ALL.iter().try_for_each(|m| self.module(*m).map(drop))
    }

    fn module(&self, module: KernelModule) -> Result<Arc<CudaModule>> {
        let mut modules = lock(&self.0.modules);
        if let Some(m) = modules.get(&module) {
            return Ok(m.clone());
        }
        let required = module.min_compute_capability();
        if !module.runs_on(self.0.compute_capability) {
            return Err(Error::UnsupportedComputeCapability {
                module: module.name(),
                ordinal: self.0.ordinal,
                required,
                found: self.0.compute_capability,
            });
        }
        let ptx = module.ptx_for(self.0.compute_capability);
        let loaded = self.0.stream.context().load_module(Ptx::from_src(ptx)).map_err(|e| {
            if e.0 == CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
                Error::PtxTooNew {
                    module: module.name(),
                    ptx_isa: module.ptx_isa().to_string(),
                    driver_version: driver_version().unwrap_or_else(|_| "unknown".into()),
                }
            } else {
                self.map_err("loading a kernel module", e)
            }
        })?;
        modules.insert(module, loaded.clone());
        Ok(loaded)
    }

    /// Maps a driver error to the crate's error, naming out-of-memory as such.
    pub(crate) fn map_err(&self, context: &'static str, e: DriverError) -> Error {
        self.map_err_bytes(context, e, 0)
    }

    pub(crate) fn map_err_bytes(&self, context: &'static str, e: DriverError, requested_bytes: usize) -> Error {
        if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            let info = self.memory_info().ok();
            Error::OutOfMemory {
                ordinal: self.0.ordinal,
                requested_bytes,
                free_bytes: info.map(|i| i.0),
                total_bytes: info.map(|i| i.1),
            }
        } else {
            Error::driver(context, e)
        }
    }
}

/// A poisoned lock only means another thread panicked while holding a cache map;
/// the map itself is still consistent (inserts are single operations).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
