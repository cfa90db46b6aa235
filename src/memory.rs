//! Host memory budget. Every allocation whose size follows from a caller's input goes
//! through here first, so a size whose element count fits in `usize` but whose memory cannot
//! exist comes back as [`Error::HostOutOfMemory`] naming the caller's argument, instead of
//! the allocator aborting the process (Rust's `Vec` aborts on a failed allocation).
//!
//! Checks, all before anything is allocated: the request against a cap the process may set
//! ([`set_host_limit`]), against the memory the kernel
//! says it can still hand out (`MemAvailable + SwapFree` of `/proc/meminfo`, read only for
//! requests of at least [`BUDGET_READ_FROM_BYTES`], so small allocations cost nothing), then
//! a fallible reservation (`Vec::try_reserve_exact`) for what the allocator itself refuses.

use crate::device::Device;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Requests below this size skip reading `/proc/meminfo` (a fallible reservation still
/// guards them): a quarter GiB cannot take a working machine down by itself.
pub const BUDGET_READ_FROM_BYTES: usize = 256 << 20;

/// Bytes of `count` elements of `elem_bytes` each, or an error naming `arg` when that
/// does not fit in `usize`.
pub fn bytes_of(arg: &'static str, count: usize, elem_bytes: usize) -> Result<usize> {
    count.checked_mul(elem_bytes).ok_or_else(|| {
        Error::invalid(arg, "a size in bytes that fits in usize", format!("{count} elements of {elem_bytes} bytes"))
    })
}

static HOST_LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Caps the host memory any single operation may ask for (bytes; `usize::MAX`, the default,
/// for no cap beyond what the system has). For processes that share a machine, and for
/// fuzzing, where inputs that would succeed with gigabytes only make a run slow.
pub fn set_host_limit(bytes: usize) {
    HOST_LIMIT.store(bytes, Ordering::Relaxed);
}

/// The cap set by [`set_host_limit`].
pub fn host_limit() -> usize {
    HOST_LIMIT.load(Ordering::Relaxed)
}

/// Host memory the system can still hand out, in bytes, where the platform says
/// (`MemAvailable + SwapFree` on Linux); `None` elsewhere.
pub fn host_available_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<usize> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: usize = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        kib.checked_mul(1024)
    };
    let available = field("MemAvailable:")?;
    Some(available.saturating_add(field("SwapFree:").unwrap_or(0)))
}

/// Checks that `count` elements of `T`, sized by the caller's argument `arg`, can exist on
/// the host; returns their size in bytes.
pub fn check_host<T>(arg: &'static str, count: usize) -> Result<usize> {
    let bytes = bytes_of(arg, count, std::mem::size_of::<T>())?;
    if bytes > isize::MAX as usize {
        return Err(Error::HostOutOfMemory { arg, requested_bytes: bytes, available_bytes: None });
    }
    if bytes > host_limit() {
        return Err(Error::HostOutOfMemory { arg, requested_bytes: bytes, available_bytes: Some(host_limit()) });
    }
    if bytes >= BUDGET_READ_FROM_BYTES {
        if let Some(available) = host_available_bytes() {
            if bytes > available {
                return Err(Error::HostOutOfMemory { arg, requested_bytes: bytes, available_bytes: Some(available) });
            }
        }
    }
    Ok(bytes)
}

/// An empty vector with room for `count` elements, checked against the budget and reserved
/// fallibly; an error names `arg`.
pub fn host_vec_with_capacity<T>(arg: &'static str, count: usize) -> Result<Vec<T>> {
    let bytes = check_host::<T>(arg, count)?;
    let mut v = Vec::new();
    v.try_reserve_exact(count).map_err(|_| Error::HostOutOfMemory {
        arg,
        requested_bytes: bytes,
        available_bytes: host_available_bytes(),
    })?;
    Ok(v)
}

/// `count` copies of `value`, checked and reserved as [`host_vec_with_capacity`].
pub fn host_vec<T: Clone>(arg: &'static str, count: usize, value: T) -> Result<Vec<T>> {
    let mut v = host_vec_with_capacity(arg, count)?;
    v.resize(count, value);
    Ok(v)
}

/// Collects an iterator of known length `count` into a vector checked and reserved as
/// [`host_vec_with_capacity`].
pub fn host_collect<T>(arg: &'static str, count: usize, items: impl IntoIterator<Item = T>) -> Result<Vec<T>> {
    let mut v = host_vec_with_capacity(arg, count)?;
    v.extend(items);
    Ok(v)
}

/// One buffer an op is about to allocate: the caller's argument its size follows from, its
/// element count (`None` when that count overflowed usize) and its bytes per element on a
/// device.
pub type Buffer = (&'static str, Option<usize>, usize);

/// Checks, before an op allocates anything, that its buffers can exist on `device`: on a
/// CUDA device against the device's memory; on the host against the budget, counting 8
/// bytes per element (the CPU references work in f64) plus the rounded result. An error
/// names the argument of the first buffer that cannot exist, or of the largest when only
/// their sum cannot.
pub fn check_buffers(device: &Device, buffers: &[Buffer]) -> Result<()> {
    let mut total = 0usize;
    let mut largest: Option<(&'static str, usize)> = None;
    for &(arg, count, elem_bytes) in buffers {
        let count = count.ok_or_else(|| Error::invalid(arg, "sizes whose product fits in usize", "an overflow"))?;
        let per = match device {
            Device::Cpu => elem_bytes + 8,
            Device::Cuda(_) => elem_bytes,
        };
        let bytes = bytes_of(arg, count, per)?;
        if largest.is_none_or(|(_, b)| bytes > b) {
            largest = Some((arg, bytes));
        }
        total = total.saturating_add(bytes);
        check_one(device, arg, bytes)?;
    }
    match largest {
        Some((arg, _)) => check_one(device, arg, total),
        None => Ok(()),
    }
}

fn check_one(device: &Device, arg: &'static str, bytes: usize) -> Result<()> {
    match device {
        Device::Cpu => check_host::<u8>(arg, bytes).map(|_| ()),
        Device::Cuda(dev) if bytes > dev.total_memory() => Err(Error::OutOfMemory {
            ordinal: dev.ordinal(),
            requested_bytes: bytes,
            free_bytes: None,
            total_bytes: Some(dev.total_memory()),
        }),
        Device::Cuda(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_that_cannot_exist_are_typed_errors_naming_the_argument() {
        let e = host_vec::<f32>("x", 1 << 40, 0.0).unwrap_err();
        assert!(matches!(e, Error::HostOutOfMemory { arg: "x", requested_bytes, .. } if requested_bytes == 1 << 42));
        let e = host_vec::<f64>("y", usize::MAX / 4, 0.0).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { arg: "y", .. }), "{e}");
        let e = host_vec::<u8>("z", usize::MAX, 0).unwrap_err();
        assert!(matches!(e, Error::HostOutOfMemory { arg: "z", .. }), "{e}");
        assert!(e.is_out_of_memory());
    }

    #[test]
    fn ordinary_sizes_allocate() {
        assert_eq!(host_vec("x", 7, 1.5f32).unwrap(), vec![1.5; 7]);
        assert!(host_vec::<f32>("x", 0, 0.0).unwrap().is_empty());
        assert_eq!(host_collect("x", 3, 0..3).unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn the_budget_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(host_available_bytes().is_some_and(|b| b > 0));
        }
    }
}
