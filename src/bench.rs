//! Kernel timing: CUDA events around each launch, warm-up first, median of many,
//! several input/output sets rotated so that their total exceeds the L2 cache, and the
//! device-to-device copy bandwidth measured on the spot as the memory ceiling.
//! Used by the CLI's `bench` and by `benches/`.

use crate::check::{random_inputs, random_knots, GridLayout, Rng};
use crate::device::{CudaDevice, Device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::bspline::{self, BasisKind, KnotGrid};
use crate::tensor::Tensor;
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
}

impl BenchRow {
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

/// A standard B-spline benchmark shape.
#[derive(Clone, Copy, Debug)]
pub struct BasisShape {
    pub batch: usize,
    pub in_features: usize,
    pub grid_size: usize,
    pub order: usize,
}

/// The KAN layer shapes of the project's targets: 4096×1024 with G = 5 and 20, k = 3,
/// and the latency case 100×1000.
pub const BASIS_SHAPES: &[BasisShape] = &[
    BasisShape { batch: 4096, in_features: 1024, grid_size: 5, order: 3 },
    BasisShape { batch: 4096, in_features: 1024, grid_size: 20, order: 3 },
    BasisShape { batch: 100, in_features: 1000, grid_size: 5, order: 3 },
];

/// Arithmetic model for reporting TFLOP/s: each of the k + 1 non-zero bases of an
/// element costs k(k+1)/2 Cox–de Boor updates of 7 flops (2 sub, 2 div, 2 mul, 1 add);
/// the derivative stops one level lower and adds 5.
pub fn basis_flops(kind: BasisKind, rows: usize, order: usize) -> f64 {
    let k = order as f64;
    let levels = if kind == BasisKind::Value { k } else { (k - 1.0).max(0.0) };
    let per_basis = 7.0 * levels * (levels + 1.0) / 2.0 + if kind == BasisKind::Derivative { 5.0 } else { 0.0 };
    rows as f64 * (k + 1.0) * per_basis
}

/// Benchmarks one B-spline op at `shape` on `device`.
pub fn bench_basis(
    device: &Device,
    kind: BasisKind,
    dtype: DType,
    shape: BasisShape,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    let mut rng = Rng::new(0x5EED ^ shape.batch as u64);
    let n_knots = shape.grid_size + 2 * shape.order + 1;
    let knots = random_knots(&mut rng, shape.in_features, shape.grid_size, shape.order, GridLayout::Uniform);
    let grid =
        KnotGrid::from_knots(&Tensor::from_vec(knots.clone(), &[shape.in_features, n_knots], device)?, shape.order)?;
    let nb = grid.n_bases();
    let rows = shape.batch * shape.in_features;
    let set_bytes = (rows + rows * nb) * dtype.size_in_bytes();
    // Enough rotating sets that one pass over them is at least 4x a 50 MB L2.
    let sets = if device.is_cuda() { (200_000_000usize.div_ceil(set_bytes)).clamp(2, 64) } else { 1 };
    let mut xs = Vec::with_capacity(sets);
    let mut outs = Vec::with_capacity(sets);
    for _ in 0..sets {
        let x = random_inputs(&mut rng, shape.batch, &knots, n_knots);
        xs.push(Tensor::from_f32(&x, &[shape.batch, shape.in_features], dtype, device)?);
        outs.push(Tensor::full(f32::NAN, &[shape.batch, shape.in_features, nb], dtype, device)?);
    }
    let mut step = |i: usize| -> Result<()> {
        let s = i % sets;
        match kind {
            BasisKind::Value => bspline::bspline_basis_into(&xs[s], &grid, &mut outs[s]),
            BasisKind::Derivative => bspline::bspline_basis_derivative_into(&xs[s], &grid, &mut outs[s]),
        }
    };
    let timing = match device {
        Device::Cuda(dev) => time_cuda(dev, reps, step)?,
        Device::Cpu => time_host(Repeats { warmup: 1, iters: reps.iters.min(5) }, &mut step)?,
    };
    let op = match kind {
        BasisKind::Value => "bspline_basis",
        BasisKind::Derivative => "bspline_basis_derivative",
    };
    Ok(BenchRow {
        op: op.into(),
        dtype,
        shape: format!("{}x{} G={} k={}", shape.batch, shape.in_features, shape.grid_size, shape.order),
        device: device.to_string(),
        timing,
        bytes: (set_bytes + knots.len() * 4) as f64,
        flops: basis_flops(kind, rows, shape.order),
        copy_gbs,
    })
}
