//! Kernel timing, shared by every op's bench rows (the CLI's `bench` and `benches/`): CUDA
//! events around each launch, warm-up first, median of many, several input/output sets
//! rotated so that their total exceeds the L2 cache, and the device-to-device copy
//! bandwidth measured on the spot as the memory ceiling.

use crate::device::{CudaDevice, Device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::driver::sys::CUevent_flags;
use std::time::Instant;

/// Repetitions of a measurement.
#[derive(Clone, Copy, Debug)]
pub struct Repeats {
    pub warmup: usize,
    pub iters: usize,
}

impl Repeats {
    pub const FULL: Repeats = Repeats { warmup: 10, iters: 100 };
    pub const SHORT: Repeats = Repeats { warmup: 3, iters: 20 };
}

/// Median and spread of per-launch times, in microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub median_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    pub samples: usize,
}

impl Timing {
    fn from_samples(mut us: Vec<f64>) -> Timing {
        us.sort_by(f64::total_cmp);
        let n = us.len();
        let median_us = if n % 2 == 1 { us[n / 2] } else { 0.5 * (us[n / 2 - 1] + us[n / 2]) };
        Timing { median_us, min_us: us[0], max_us: us[n - 1], samples: n }
    }
}

/// Times `f(i)` on `dev`'s stream with a pair of CUDA events around each call; `i`
/// counts calls so the caller can rotate inputs.
pub fn time_cuda(dev: &CudaDevice, reps: Repeats, mut f: impl FnMut(usize) -> Result<()>) -> Result<Timing> {
    let ctx = dev.stream().context();
    let ev = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| Error::driver("cuEventCreate", e));
    for i in 0..reps.warmup {
        f(i)?;
    }
    let events: Vec<_> = (0..=reps.iters).map(|_| ev()).collect::<Result<_>>()?;
    let record = |e: &cudarc::driver::CudaEvent| e.record(dev.stream()).map_err(|e| Error::driver("cuEventRecord", e));
    // Back-to-back launches with an event between each: event k..k+1 brackets launch k.
    record(&events[0])?;
    for i in 0..reps.iters {
        f(reps.warmup + i)?;
        record(&events[i + 1])?;
    }
    dev.synchronize()?;
    let us = events
        .windows(2)
        .map(|w| w[0].elapsed_ms(&w[1]).map(|ms| ms as f64 * 1e3).map_err(|e| Error::driver("cuEventElapsedTime", e)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Timing::from_samples(us))
}

/// Times `f(i)` on the host clock (CPU path).
pub fn time_host(reps: Repeats, mut f: impl FnMut(usize) -> Result<()>) -> Result<Timing> {
    for i in 0..reps.warmup {
        f(i)?;
    }
    let mut us = Vec::with_capacity(reps.iters);
    for i in 0..reps.iters {
        let t = Instant::now();
        f(reps.warmup + i)?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(Timing::from_samples(us))
}

/// Times `f(i)` by CUDA events on a GPU, or on the host clock with at most two calls (the
/// CPU path is the f64 reference: slow, and timed only to show it runs).
pub fn time_on(device: &Device, reps: Repeats, f: impl FnMut(usize) -> Result<()>) -> Result<Timing> {
    match device {
        Device::Cuda(dev) => time_cuda(dev, reps, f),
        Device::Cpu => time_host(Repeats { warmup: 0, iters: reps.iters.min(2) }, f),
    }
}

/// Device-to-device copy bandwidth in GB/s (bytes read plus bytes written), on a
/// buffer far larger than L2.
pub fn copy_bandwidth_gbs(dev: &CudaDevice, reps: Repeats) -> Result<f64> {
    const BYTES: usize = 1 << 30;
    let s = dev.stream();
    let map = |e| dev.map_err_bytes("allocating the copy benchmark buffers", e, BYTES);
    let src = s.alloc_zeros::<u8>(BYTES).map_err(map)?;
    let mut dst = s.alloc_zeros::<u8>(BYTES).map_err(map)?;
    let t = time_cuda(dev, reps, |_| s.memcpy_dtod(&src, &mut dst).map_err(|e| Error::driver("cuMemcpyDtoD", e)))?;
    Ok(2.0 * BYTES as f64 / (t.median_us * 1e-6) / 1e9)
}

/// One row of the bench table.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub op: String,
    pub dtype: DType,
    pub shape: String,
    pub device: String,
    pub timing: Timing,
    pub bytes: f64,
    pub flops: f64,
    /// Copy bandwidth the GB/s is compared with (None on the CPU).
    pub copy_gbs: Option<f64>,
    /// The project's speed target for this row, if it has one (H100 numbers).
    pub target_us: Option<f64>,
    /// Peak device memory the op allocated beyond its inputs and parameters.
    pub peak_extra_bytes: Option<u64>,
}

impl BenchRow {
    /// A row of a memory-bound op: `bytes` moved, no FLOP count, no target.
    pub fn memory_bound(
        op: String,
        dtype: DType,
        shape: String,
        device: &Device,
        timing: Timing,
        bytes: f64,
        copy_gbs: Option<f64>,
    ) -> BenchRow {
        BenchRow {
            op,
            dtype,
            shape,
            device: device.to_string(),
            timing,
            bytes,
            flops: 0.0,
            copy_gbs,
            target_us: None,
            peak_extra_bytes: None,
        }
    }

    pub fn gbs(&self) -> f64 {
        self.bytes / (self.timing.median_us * 1e-6) / 1e9
    }

    pub fn tflops(&self) -> f64 {
        self.flops / (self.timing.median_us * 1e-6) / 1e12
    }

    pub fn pct_of_copy(&self) -> Option<f64> {
        self.copy_gbs.map(|c| 100.0 * self.gbs() / c)
    }
}

/// What every bench row of one `bench` run shares: where it runs, how often, whether the
/// short table was asked for, and the copy bandwidth measured at the start of the run.
#[derive(Clone, Copy, Debug)]
pub struct BenchContext<'a> {
    pub device: &'a Device,
    pub reps: Repeats,
    pub short: bool,
    pub copy_gbs: Option<f64>,
}

impl BenchContext<'_> {
    /// The element types a row family runs: f32 and bf16 in the short table, f16 too in the
    /// full one.
    pub fn dtypes(&self) -> &'static [DType] {
        if self.short {
            &[DType::F32, DType::BF16]
        } else {
            &[DType::F32, DType::BF16, DType::F16]
        }
    }
}
