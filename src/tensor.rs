//! A minimal typed tensor: element type, shape, contiguous row-major storage on the host
//! or on one CUDA device. It exists to carry kernel inputs and outputs; arithmetic lives
//! in the ops.

use crate::device::{CudaDevice, Device};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::memory::{host_collect, host_vec};
use cudarc::driver::{CudaSlice, DevicePtr};
use half::{bf16, f16};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub(crate) enum HostData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

#[derive(Clone, Debug)]
pub(crate) enum CudaData {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
}

#[derive(Clone, Debug)]
pub(crate) enum Storage {
    Host(HostData),
    Cuda(CudaDevice, CudaData),
}

/// Contiguous row-major tensor of f32, bf16 or f16.
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

macro_rules! by_dtype {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            HostData::F32($v) => $body,
            HostData::BF16($v) => $body,
            HostData::F16($v) => $body,
        }
    };
}

/// "1 element", "7 elements".
fn elements(n: usize) -> String {
    if n == 1 {
        "1 element".into()
    } else {
        format!("{n} elements")
    }
}

/// Element count of `shape`, or an error naming `arg` when the product overflows usize.
pub fn elem_count(arg: &'static str, shape: &[usize]) -> Result<usize> {
    // A zero dimension empties the tensor whatever the others are (their product may overflow).
    if shape.contains(&0) {
        return Ok(0);
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(arg, "a shape whose element count fits in usize", format!("{shape:?}")))
}

impl Tensor {
    /// Takes ownership of `data` as a tensor of `shape` on `device` (copied there if CUDA).
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = elem_count("shape", shape)?;
        if n != data.len() {
            return Err(Error::invalid("data", format!("{} for shape {shape:?}", elements(n)), elements(data.len())));
        }
        let host = Tensor { shape: shape.to_vec(), storage: Storage::Host(T::wrap(data)) };
        match device {
            Device::Cpu => Ok(host),
            Device::Cuda(_) => host.to_device(device),
        }
    }

    /// A host tensor of `dtype` from f64 values, each rounded once (to nearest even): how
    /// the f64 CPU references hand out their results.
    pub fn from_f64_rounded(values: &[f64], shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n = values.len();
        let cpu = &Device::Cpu;
        match dtype {
            DType::F32 => Tensor::from_vec(host_collect("values", n, values.iter().map(|&x| x as f32))?, shape, cpu),
            DType::BF16 => {
                Tensor::from_vec(host_collect("values", n, values.iter().map(|&x| bf16::from_f64(x)))?, shape, cpu)
            }
            DType::F16 => {
                Tensor::from_vec(host_collect("values", n, values.iter().map(|&x| f16::from_f64(x)))?, shape, cpu)
            }
        }
    }

    /// Converts f32 values to `dtype` (round to nearest even) and places them on `device`.
    pub fn from_f32(data: &[f32], shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = data.len();
        match dtype {
            DType::F32 => Tensor::from_vec(host_collect("data", n, data.iter().copied())?, shape, device),
            DType::BF16 => {
                Tensor::from_vec(host_collect("data", n, data.iter().map(|&v| bf16::from_f32(v)))?, shape, device)
            }
            DType::F16 => {
                Tensor::from_vec(host_collect("data", n, data.iter().map(|&v| f16::from_f32(v)))?, shape, device)
            }
        }
    }

    /// A tensor with every element equal to `value` (NaN poisons outputs in tests).
    pub fn full(value: f32, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = elem_count("shape", shape)?;
        if let Device::Cuda(dev) = device {
            // Filled on the device: no host buffer, no copy.
            crate::memory::check_buffers(device, &[("shape", Some(n), dtype.size_in_bytes())])?;
            // SAFETY (allocation): fill_value writes every element before anything reads it.
            let t = unsafe { Tensor::cuda_uninit(dev, dtype, shape)? };
            t.fill_value(value)?;
            return Ok(t);
        }
        let host = match dtype {
            DType::F32 => HostData::F32(host_vec("shape", n, value)?),
            DType::BF16 => HostData::BF16(host_vec("shape", n, bf16::from_f32(value))?),
            DType::F16 => HostData::F16(host_vec("shape", n, f16::from_f32(value))?),
        };
        let t = Tensor::from_host(shape.to_vec(), host);
        match device {
            Device::Cpu => Ok(t),
            Device::Cuda(_) => t.to_device(device),
        }
    }

    pub(crate) fn from_cuda(shape: Vec<usize>, device: CudaDevice, data: CudaData) -> Tensor {
        Tensor { shape, storage: Storage::Cuda(device, data) }
    }

    pub(crate) fn from_host(shape: Vec<usize>, data: HostData) -> Tensor {
        Tensor { shape, storage: Storage::Host(data) }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn elem_count(&self) -> usize {
        // Validated when the tensor was made: the product fits, or a dimension is 0.
        if self.shape.contains(&0) {
            0
        } else {
            self.shape.iter().product()
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        self.elem_count() * self.dtype().size_in_bytes()
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Host(h) => h.dtype(),
            Storage::Cuda(_, c) => c.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Host(_) => Device::Cpu,
            Storage::Cuda(d, _) => Device::Cuda(d.clone()),
        }
    }

    pub(crate) fn storage(&self) -> &Storage {
        &self.storage
    }

    pub(crate) fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    /// The same values with a new shape of equal element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        let n = elem_count("shape", shape)?;
        if n != self.elem_count() {
            return Err(Error::invalid(
                "shape",
                format!("{} elements (from {:?})", self.elem_count(), self.shape),
                format!("{shape:?}"),
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Copies to `device` (a clone when already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        let storage = match (&self.storage, device) {
            (Storage::Host(h), Device::Cpu) => Storage::Host(h.clone()),
            (Storage::Host(h), Device::Cuda(d)) => Storage::Cuda(d.clone(), h.upload(d)?),
            (Storage::Cuda(_, c), Device::Cpu) => Storage::Host(c.download()?),
            (Storage::Cuda(src, c), Device::Cuda(dst)) if src == dst => Storage::Cuda(dst.clone(), c.clone()),
            (Storage::Cuda(_, c), Device::Cuda(dst)) => Storage::Cuda(dst.clone(), c.download()?.upload(dst)?),
        };
        Ok(Tensor { shape: self.shape.clone(), storage })
    }

    /// The elements as `T`, which must be the tensor's element type (copied from the device).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        let host = match &self.storage {
            Storage::Host(h) => h.clone(),
            Storage::Cuda(_, c) => c.download()?,
        };
        T::unwrap(host).map_err(|found| Error::DTypeMismatch {
            arg: "to_vec",
            expected: T::DTYPE.to_string(),
            found: found.to_string(),
        })
    }

    /// The elements widened to f64, whatever the element type.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        let host = match &self.storage {
            Storage::Host(h) => std::borrow::Cow::Borrowed(h),
            Storage::Cuda(_, c) => std::borrow::Cow::Owned(c.download()?),
        };
        let n = self.elem_count();
        by_dtype!(host.as_ref(), v => host_collect("tensor", n, v.iter().map(|x| x.to_f64())))
    }

    /// The elements widened to f32, whatever the element type.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let host = match &self.storage {
            Storage::Host(h) => std::borrow::Cow::Borrowed(h),
            Storage::Cuda(_, c) => std::borrow::Cow::Owned(c.download()?),
        };
        let n = self.elem_count();
        by_dtype!(host.as_ref(), v => host_collect("tensor", n, v.iter().map(|x| x.to_f64() as f32)))
    }

    /// Converts to another element type (round to nearest even), on the host.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let values = self.to_f32_vec()?;
        Tensor::from_f32(&values, &self.shape, dtype, &self.device())
    }

    /// Checks that `self`, the argument `arg`, has element type `dtype`.
    pub(crate) fn expect_dtype(&self, arg: &'static str, dtype: DType) -> Result<()> {
        if self.dtype() != dtype {
            return Err(Error::DTypeMismatch { arg, expected: dtype.to_string(), found: self.dtype().to_string() });
        }
        Ok(())
    }

    /// Checks that `self`, the argument `arg`, lives on `device`.
    pub(crate) fn expect_device(&self, arg: &'static str, device: &Device) -> Result<()> {
        let here = self.device();
        if &here != device {
            return Err(Error::DeviceMismatch { arg, expected: device.to_string(), found: here.to_string() });
        }
        Ok(())
    }

    /// Checks that `self`, the argument `arg`, has exactly `shape`.
    pub(crate) fn expect_shape(&self, arg: &'static str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(Error::invalid(arg, format!("shape {shape:?}"), format!("shape {:?}", self.shape)));
        }
        Ok(())
    }
}

impl HostData {
    fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::BF16(_) => DType::BF16,
            HostData::F16(_) => DType::F16,
        }
    }

    fn bytes(&self) -> &[u8] {
        by_dtype!(self, v => bytemuck::cast_slice(v.as_slice()))
    }

    fn upload(&self, device: &CudaDevice) -> Result<CudaData> {
        let s = device.stream();
        let bytes = self.bytes().len();
        let map = |e| device.map_err_bytes("copying host to device", e, bytes);
        Ok(match self {
            HostData::F32(v) => CudaData::F32(s.clone_htod(v).map_err(map)?),
            HostData::BF16(v) => CudaData::BF16(s.clone_htod(v).map_err(map)?),
            HostData::F16(v) => CudaData::F16(s.clone_htod(v).map_err(map)?),
        })
    }
}

impl CudaData {
    pub(crate) fn dtype(&self) -> DType {
        match self {
            CudaData::F32(_) => DType::F32,
            CudaData::BF16(_) => DType::BF16,
            CudaData::F16(_) => DType::F16,
        }
    }

    fn download(&self) -> Result<HostData> {
        let map = |e| crate::error::Error::driver("copying device to host", e);
        Ok(match self {
            CudaData::F32(v) => HostData::F32(v.stream().clone_dtoh(v).map_err(map)?),
            CudaData::BF16(v) => HostData::BF16(v.stream().clone_dtoh(v).map_err(map)?),
            CudaData::F16(v) => HostData::F16(v.stream().clone_dtoh(v).map_err(map)?),
        })
    }
}

/// Typed access to device storage, so launch code can be written once over `T`.
pub(crate) trait CudaElement: Element {
    fn slice(d: &CudaData) -> Option<&CudaSlice<Self>>;
    fn slice_mut(d: &mut CudaData) -> Option<&mut CudaSlice<Self>>;
}

macro_rules! cuda_element {
    ($t:ty, $variant:ident) => {
        impl CudaElement for $t {
            fn slice(d: &CudaData) -> Option<&CudaSlice<Self>> {
                match d {
                    CudaData::$variant(s) => Some(s),
                    _ => None,
                }
            }
            fn slice_mut(d: &mut CudaData) -> Option<&mut CudaSlice<Self>> {
                match d {
                    CudaData::$variant(s) => Some(s),
                    _ => None,
                }
            }
        }
    };
}
cuda_element!(f32, F32);
cuda_element!(bf16, BF16);
cuda_element!(f16, F16);

impl Tensor {
    /// The device slice of a CUDA tensor of element type `T`, or an error naming `arg`.
    pub(crate) fn cuda_slice<T: CudaElement>(&self, arg: &'static str) -> Result<&CudaSlice<T>> {
        match &self.storage {
            Storage::Cuda(_, d) => T::slice(d).ok_or_else(|| Error::DTypeMismatch {
                arg,
                expected: T::DTYPE.to_string(),
                found: d.dtype().to_string(),
            }),
            Storage::Host(_) => {
                Err(Error::DeviceMismatch { arg, expected: "a CUDA device".into(), found: "cpu".into() })
            }
        }
    }

    pub(crate) fn cuda_slice_mut<T: CudaElement>(&mut self, arg: &'static str) -> Result<&mut CudaSlice<T>> {
        match &mut self.storage {
            Storage::Cuda(_, d) => {
                let found = d.dtype();
                T::slice_mut(d).ok_or_else(|| Error::DTypeMismatch {
                    arg,
                    expected: T::DTYPE.to_string(),
                    found: found.to_string(),
                })
            }
            Storage::Host(_) => {
                Err(Error::DeviceMismatch { arg, expected: "a CUDA device".into(), found: "cpu".into() })
            }
        }
    }

    /// A CUDA tensor of `shape` whose memory is not initialised.
    ///
    /// # Safety
    /// The caller must fully write the tensor (by a kernel or copy queued on the device's
    /// stream) before anything reads it; until then its bytes are arbitrary.
    pub(crate) unsafe fn cuda_uninit(dev: &CudaDevice, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let n = elem_count("shape", shape)?;
        let bytes = n.checked_mul(dtype.size_in_bytes()).ok_or_else(|| {
            Error::invalid("shape", "a size in bytes that fits in usize", format!("{n} elements of {dtype}"))
        })?;
        let s = dev.stream();
        let map = |e| dev.map_err_bytes("allocating device memory", e, bytes);
        // SAFETY: forwarded to the caller (see # Safety).
        let data = unsafe {
            match dtype {
                DType::F32 => CudaData::F32(s.alloc::<f32>(n).map_err(map)?),
                DType::BF16 => CudaData::BF16(s.alloc::<bf16>(n).map_err(map)?),
                DType::F16 => CudaData::F16(s.alloc::<f16>(n).map_err(map)?),
            }
        };
        let t = Tensor::from_cuda(shape.to_vec(), dev.clone(), data);
        if poison_allocations() && bytes > 0 {
            t.fill_bytes(0xFF)?;
        }
        Ok(t)
    }

    /// Sets every element of a CUDA tensor to `value` (rounded to its type) on its stream.
    fn fill_value(&self, value: f32) -> Result<()> {
        let Storage::Cuda(dev, data) = &self.storage else { return Ok(()) };
        let s = dev.stream();
        let n = self.elem_count();
        if n == 0 {
            return Ok(());
        }
        // SAFETY (each arm): ptr is the start of this tensor's allocation of n elements of the
        // arm's type, valid on `s`, where the memset is queued in order with every other use.
        let r = match data {
            CudaData::F32(v) => {
                let (ptr, _record) = v.device_ptr(s);
                unsafe { cudarc::driver::sys::cuMemsetD32Async(ptr, value.to_bits(), n, s.cu_stream()) }
            }
            CudaData::BF16(v) => {
                let (ptr, _record) = v.device_ptr(s);
                unsafe { cudarc::driver::sys::cuMemsetD16Async(ptr, bf16::from_f32(value).to_bits(), n, s.cu_stream()) }
            }
            CudaData::F16(v) => {
                let (ptr, _record) = v.device_ptr(s);
                unsafe { cudarc::driver::sys::cuMemsetD16Async(ptr, f16::from_f32(value).to_bits(), n, s.cu_stream()) }
            }
        };
        r.result().map_err(|e| dev.map_err("filling a tensor", e))
    }

    /// Sets every byte of a CUDA tensor (0xFF: NaN in f32, bf16 and f16).
    fn fill_bytes(&self, byte: u8) -> Result<()> {
        let Storage::Cuda(dev, data) = &self.storage else { return Ok(()) };
        let s = dev.stream();
        let (ptr, _record) = match data {
            CudaData::F32(v) => v.device_ptr(s),
            CudaData::BF16(v) => v.device_ptr(s),
            CudaData::F16(v) => v.device_ptr(s),
        };
        // SAFETY: ptr is the start of this tensor's allocation of size_in_bytes() bytes,
        // valid on `s`, where the memset is queued in order with every other use.
        unsafe { cudarc::driver::sys::cuMemsetD8Async(ptr, byte, self.size_in_bytes(), s.cu_stream()) }
            .result()
            .map_err(|e| dev.map_err("cuMemsetD8Async", e))
    }
}

/// HYBRID_KERNELS_POISON=1: fill every uninitialised device allocation with NaN bytes, so
/// tests of ops that allocate their outputs still prove every element is written.
fn poison_allocations() -> bool {
    static POISON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *POISON.get_or_init(|| std::env::var("HYBRID_KERNELS_POISON").is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// Moving typed vectors in and out of [`HostData`] without a match at each call site.
trait HostElement: Sized {
    fn wrap(v: Vec<Self>) -> HostData;
    fn unwrap(h: HostData) -> std::result::Result<Vec<Self>, DType>;
}

impl<T: Element> HostElement for T {
    fn wrap(v: Vec<T>) -> HostData {
        // Element is sealed to exactly these three types; the casts are identities.
        match T::DTYPE {
            DType::F32 => HostData::F32(bytemuck::allocation::cast_vec(v)),
            DType::BF16 => HostData::BF16(bytemuck::allocation::cast_vec(v)),
            DType::F16 => HostData::F16(bytemuck::allocation::cast_vec(v)),
        }
    }

    fn unwrap(h: HostData) -> std::result::Result<Vec<T>, DType> {
        let found = h.dtype();
        if found != T::DTYPE {
            return Err(found);
        }
        Ok(by_dtype!(h, v => bytemuck::allocation::cast_vec(v)))
    }
}

/// Writes named tensors to a safetensors file (copied to the host first). Names must be
/// distinct. The file is written whole or not at all: to a temporary file beside `path`,
/// synced, then renamed over it, so a failed write leaves what was at `path` untouched.
pub fn save_safetensors<P: AsRef<Path>>(path: P, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    for (i, (name, _)) in tensors.iter().enumerate() {
        if tensors[..i].iter().any(|(other, _)| other == name) {
            return Err(Error::invalid("tensors", "distinct names", format!("`{name}` twice")));
        }
    }
    let mut host: Vec<(String, HostData, Vec<usize>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let data = match &t.storage {
            Storage::Host(h) => h.clone(),
            Storage::Cuda(_, c) => c.download()?,
        };
        host.push((name.to_string(), data, t.shape.clone()));
    }
    let problem = |e: safetensors::SafeTensorError| Error::Safetensors {
        path: shown.clone(),
        problem: crate::error::describe_safetensors(&e),
    };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = host
        .iter()
        .map(|(name, data, shape)| {
            safetensors::tensor::TensorView::new(data.dtype().to_safetensors(), shape.clone(), data.bytes())
                .map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(problem)?;
    let bytes = safetensors::serialize(views, &None).map_err(problem)?;
    write_atomically(path, &bytes)
}

/// Writes `bytes` to a temporary file in `path`'s folder, syncs it and renames it over
/// `path`: readers see the old file or the new one, never a part. The temporary file is
/// removed if anything fails.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |source| Error::Io { path: path.display().to_string(), source };
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid("path", "a file path (with a file name)", format!("{}", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    written.map_err(io)
}

/// Reads every tensor of a safetensors file onto `device`. Element types other than
/// f32, bf16 and f16 are an error naming the tensor.
pub fn load_safetensors<P: AsRef<Path>>(path: P, device: &Device) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
        path: path.display().to_string(),
        problem: crate::error::describe_safetensors(&e),
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let dtype = DType::from_safetensors(view.dtype()).ok_or_else(|| Error::DTypeMismatch {
            arg: "safetensors tensor",
            expected: "F32, BF16 or F16".into(),
            found: format!("{:?} for `{name}` in {}", view.dtype(), path.display()),
        })?;
        let raw = view.data();
        // safetensors data is little-endian and not necessarily aligned: copy out by value.
        let host = match dtype {
            DType::F32 => {
                HostData::F32(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            DType::BF16 => HostData::BF16(raw.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect()),
            DType::F16 => HostData::F16(raw.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect()),
        };
        let t = Tensor { shape: view.shape().to_vec(), storage: Storage::Host(host) };
        out.insert(name, t.to_device(device)?);
    }
    Ok(out)
}
