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
        target_us: None,
        peak_extra_bytes: None,
    })
}

/// A KANLinear benchmark case.
#[derive(Clone, Copy, Debug)]
pub struct KanShape {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub grid_size: usize,
    pub order: usize,
}

/// What to time of a KANLinear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KanPass {
    Forward,
    ForwardBackward,
}

/// The project's KANLinear shapes: 4096x1024->1024 with G = 5 and 20 (k = 3), and the
/// latency case 100x1000->1000.
pub const KAN_SHAPES: &[KanShape] = &[
    KanShape { batch: 4096, in_features: 1024, out_features: 1024, grid_size: 5, order: 3 },
    KanShape { batch: 4096, in_features: 1024, out_features: 1024, grid_size: 20, order: 3 },
    KanShape { batch: 100, in_features: 1000, out_features: 1000, grid_size: 5, order: 3 },
];

/// The targets of the KAN issue (H100), in microseconds.
pub fn kan_target_us(shape: KanShape, pass: KanPass, dtype: DType, tf32: bool) -> Option<f64> {
    let main = shape.batch == 4096 && shape.in_features == 1024 && shape.out_features == 1024 && shape.grid_size == 5;
    let latency = shape.batch == 100 && shape.in_features == 1000;
    match (main, latency, pass, dtype, tf32) {
        (true, _, KanPass::Forward, DType::BF16, _) => Some(240.0),
        (true, _, KanPass::ForwardBackward, DType::BF16, _) => Some(900.0),
        (true, _, KanPass::Forward, DType::F32, false) => Some(2000.0),
        (true, _, KanPass::ForwardBackward, DType::F32, false) => Some(6000.0),
        (_, true, KanPass::Forward, DType::F32, false) => Some(60.0),
        _ => None,
    }
}

/// Benchmarks a KANLinear pass on the forward pipeline `path`; FLOPs count the GEMMs
/// (forward: 2 rows out in (G + k + 1), forward + backward: three times that) whichever
/// path runs, bytes the inputs, parameters and outputs once. Inputs rotate among 4 sets and
/// the layer among copies whose parameters together exceed 150 MB, so that neither is
/// served from L2 (as in a model, where other layers run between two calls of one).
pub fn bench_kan(
    device: &Device,
    pass: KanPass,
    dtype: DType,
    tf32: bool,
    path: crate::ops::kan::KanForwardPath,
    shape: KanShape,
    reps: Repeats,
) -> Result<BenchRow> {
    use crate::ops::kan::{KanForwardPath, KanLinear, KanLinearConfig};
    let mut cfg = KanLinearConfig::new(shape.in_features, shape.out_features);
    cfg.grid_size = shape.grid_size;
    cfg.spline_order = shape.order;
    let mut layer = KanLinear::new(cfg, dtype, device, 1)?;
    layer.set_allow_tf32(tf32);
    layer.set_forward_path(path);
    let param_bytes = (shape.in_features * shape.out_features * (shape.grid_size + shape.order + 2)) as f64
        * dtype.size_in_bytes() as f64;
    let copies = if device.is_cuda() { ((150e6 / param_bytes).ceil() as usize).clamp(1, 8) } else { 1 };
    let mut layers = vec![layer.clone()];
    for _ in 1..copies {
        // A deep copy: through the host, into fresh device allocations.
        layers.push(layer.to_device(&Device::Cpu)?.to_device(device)?);
    }
    let mut rng = Rng::new(0xC0FFEE);
    let sets = if device.is_cuda() { 4 } else { 1 };
    let mut xs = Vec::with_capacity(sets);
    let mut dys = Vec::with_capacity(sets);
    for _ in 0..sets {
        let x: Vec<f32> = (0..shape.batch * shape.in_features).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let dy: Vec<f32> = (0..shape.batch * shape.out_features).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        xs.push(Tensor::from_f32(&x, &[shape.batch, shape.in_features], dtype, device)?);
        dys.push(Tensor::from_f32(&dy, &[shape.batch, shape.out_features], dtype, device)?);
    }
    let step = |i: usize| -> Result<()> {
        let (s, l) = (i % sets, &layers[i % copies]);
        match pass {
            KanPass::Forward => l.forward(&xs[s]).map(drop),
            KanPass::ForwardBackward => {
                l.forward(&xs[s])?;
                l.backward(&xs[s], &dys[s]).map(drop)
            }
        }
    };
    let (timing, peak) = match device {
        Device::Cuda(dev) => {
            for i in 0..copies.max(2) {
                step(i)?; // warm-up outside the peak measurement: module loads, cuBLAS handle
            }
            dev.synchronize()?;
            let (before, _) = dev.pool_usage()?;
            dev.reset_pool_peak()?;
            step(1)?;
            dev.synchronize()?;
            let (_, high) = dev.pool_usage()?;
            (time_cuda(dev, reps, step)?, Some(high.saturating_sub(before)))
        }
        Device::Cpu => (time_host(Repeats { warmup: 0, iters: reps.iters.min(3) }, step)?, None),
    };
    let path_name = match device {
        Device::Cuda(_) => match layer.resolved_forward_path(shape.batch) {
            KanForwardPath::Direct => " direct",
            KanForwardPath::DirectTf32x3 => " tf32x3",
            _ => " gemm",
        },
        Device::Cpu => "",
    };
    let nb = shape.grid_size + shape.order;
    let (rows, inf, outf) = (shape.batch as f64, shape.in_features as f64, shape.out_features as f64);
    let gemm = 2.0 * rows * outf * inf * (nb as f64 + 1.0);
    let params = outf * inf * (nb as f64 + 2.0);
    let es = dtype.size_in_bytes() as f64;
    let (flops, bytes) = match pass {
        KanPass::Forward => (gemm, es * (rows * inf + params + rows * outf)),
        KanPass::ForwardBackward => (3.0 * gemm, es * (2.0 * rows * inf + 2.0 * params + 2.0 * rows * outf)),
    };
    let op = match pass {
        KanPass::Forward => "kan_linear forward",
        KanPass::ForwardBackward => "kan_linear fwd+bwd",
    };
    Ok(BenchRow {
        op: format!("{op}{path_name}"),
        dtype,
        shape: format!(
            "{}x{}->{} G={}{}",
            shape.batch,
            shape.in_features,
            shape.out_features,
            shape.grid_size,
            if tf32 { " tf32" } else { "" }
        ),
        device: device.to_string(),
        timing,
        bytes,
        flops,
        copy_gbs: None,
        target_us: kan_target_us(shape, pass, dtype, tf32),
        peak_extra_bytes: peak,
    })
}

/// Benchmarks the B-spline activation's forward (or forward + backward) on (rows, channels).
#[allow(clippy::too_many_arguments)]
pub fn bench_activation(
    device: &Device,
    backward: bool,
    dtype: DType,
    rows: usize,
    channels: usize,
    grid_size: usize,
    order: usize,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    use crate::ops::spline_activation::SplineActivation;
    let act = SplineActivation::new(channels, grid_size, order, (-1.0, 1.0), true, dtype, device)?;
    let mut rng = Rng::new(0xAC7);
    let sets = if device.is_cuda() { 4 } else { 1 };
    let mut inputs = Vec::with_capacity(sets);
    for _ in 0..sets {
        let x: Vec<f32> = (0..rows * channels).map(|_| rng.uniform(-1.2, 1.2) as f32).collect();
        let dy: Vec<f32> = (0..rows * channels).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        inputs.push((
            Tensor::from_f32(&x, &[rows, channels], dtype, device)?,
            Tensor::from_f32(&dy, &[rows, channels], dtype, device)?,
        ));
    }
    let step = |i: usize| -> Result<()> {
        let (x, dy) = &inputs[i % sets];
        act.forward(x)?;
        if backward {
            act.backward(x, dy)?;
        }
        Ok(())
    };
    let timing = match device {
        Device::Cuda(dev) => time_cuda(dev, reps, step)?,
        Device::Cpu => time_host(Repeats { warmup: 0, iters: reps.iters.min(3) }, step)?,
    };
    let es = dtype.size_in_bytes() as f64;
    let n = (rows * channels) as f64;
    // forward: read x, write y; backward adds read x, dy, write dx (parameters are small).
    let bytes = if backward { 5.0 * n * es } else { 2.0 * n * es };
    Ok(BenchRow {
        op: if backward { "spline_activation fwd+bwd".into() } else { "spline_activation forward".into() },
        dtype,
        shape: format!("{rows}x{channels} G={grid_size} k={order}"),
        device: device.to_string(),
        timing,
        bytes,
        flops: 0.0,
        copy_gbs,
        target_us: None,
        peak_extra_bytes: None,
    })
}

/// A selective-scan benchmark shape (mamba-ssm's layout: B, D, L, N; one group of B / C).
#[derive(Clone, Copy, Debug)]
pub struct ScanShape {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    pub dstate: usize,
}

/// The shape (B=8, D=1536, L=2048, N=16), L from 128 to 65536 at about the same
/// number of tokens, and N=64.
pub const SCAN_SHAPES: &[ScanShape] = &[
    ScanShape { batch: 8, dim: 1536, len: 2048, dstate: 16 },
    ScanShape { batch: 128, dim: 1536, len: 128, dstate: 16 },
    ScanShape { batch: 32, dim: 1536, len: 512, dstate: 16 },
    ScanShape { batch: 2, dim: 1536, len: 8192, dstate: 16 },
    ScanShape { batch: 1, dim: 1536, len: 65536, dstate: 16 },
    ScanShape { batch: 8, dim: 1536, len: 2048, dstate: 64 },
];

/// Which part of the scan a row times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanPass {
    /// Inference: output and last state.
    Forward,
    /// Training forward: also saves the backward's checkpoints.
    ForwardForBackward,
    /// Backward from the forward's checkpoints.
    Backward,
}

/// The project's targets at the shape (mamba-ssm's selective_scan_cuda, H100: bf16
/// 449 / 1841 µs, f32 875 / 2048 µs forward / backward; targets half of those).
pub fn scan_target_us(shape: ScanShape, pass: ScanPass, dtype: DType) -> Option<f64> {
    if (shape.batch, shape.dim, shape.len, shape.dstate) != (8, 1536, 2048, 16) {
        return None;
    }
    match (pass, dtype) {
        (ScanPass::Forward, DType::BF16) => Some(225.0),
        (ScanPass::Backward, DType::BF16) => Some(920.0),
        (ScanPass::Forward, DType::F32) => Some(440.0),
        (ScanPass::Backward, DType::F32) => Some(1000.0),
        _ => None,
    }
}

/// Benchmarks the selective scan as mamba's blocks call it: time-varying B and C (one
/// group), D, z, delta_bias and softplus.
pub fn bench_scan(
    device: &Device,
    pass: ScanPass,
    dtype: DType,
    shape: ScanShape,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    use crate::check::ScanCase;
    use crate::ops::selective_scan::{selective_scan, selective_scan_backward, selective_scan_for_backward};
    let case = ScanCase {
        batch: shape.batch,
        dim: shape.dim,
        dstate: shape.dstate,
        len: shape.len,
        groups: 1,
        b_variable: true,
        c_variable: true,
        with_d: true,
        with_z: true,
        with_bias: true,
        softplus: true,
        with_h0: false,
        with_resets: false,
        with_dlast: false,
        checkpoints: true,
        a_max: 16.0,
        dtype,
    };
    let n = shape.batch * shape.dim * shape.len;
    let es = dtype.size_in_bytes() as f64;
    // Two input sets: at the shape one set is ~150 MB in bf16, three times L2.
    let sets = if device.is_cuda() { 2 } else { 1 };
    let mut rng = Rng::new(0x5CA7);
    let mut data = Vec::with_capacity(sets);
    for _ in 0..sets {
        let t = case.tensors(&mut rng)?.to_device(device)?;
        let dout: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let dout = Tensor::from_f32(&dout, &[shape.batch, shape.dim, shape.len], dtype, device)?;
        let ckpt = selective_scan_for_backward(&t.inputs())?.1;
        data.push((t, dout, ckpt));
    }
    let in_use = match device {
        Device::Cuda(dev) => {
            dev.synchronize()?;
            dev.reset_pool_peak()?;
            dev.pool_usage()?.0
        }
        Device::Cpu => 0,
    };
    let step = |i: usize| -> Result<()> {
        let (t, dout, ckpt) = &data[i % sets];
        match pass {
            ScanPass::Forward => drop(selective_scan(&t.inputs())?),
            ScanPass::ForwardForBackward => drop(selective_scan_for_backward(&t.inputs())?),
            ScanPass::Backward => drop(selective_scan_backward(&t.inputs(), dout, None, Some(ckpt))?),
        }
        Ok(())
    };
    let timing = time_on(device, reps, step)?;
    let peak_extra_bytes = match device {
        Device::Cuda(dev) => Some(dev.pool_usage()?.1.saturating_sub(in_use)),
        Device::Cpu => None,
    };
    let bc = 2.0 * (shape.batch * shape.dstate * shape.len) as f64 * es;
    let ckpt_bytes = data[0].2.size_in_bytes() as f64;
    // Forward: read u, delta, z, B, C; write out. Backward: read u, delta, z, dout, B, C and
    // the checkpoints; write du, ddelta, dz, dB, dC.
    let bytes = match pass {
        ScanPass::Forward => 4.0 * n as f64 * es + bc,
        ScanPass::ForwardForBackward => 4.0 * n as f64 * es + bc + ckpt_bytes,
        ScanPass::Backward => 7.0 * n as f64 * es + 2.0 * bc + ckpt_bytes,
    };
    let op = match pass {
        ScanPass::Forward => "selective_scan forward",
        ScanPass::ForwardForBackward => "selective_scan fwd (ckpt)",
        ScanPass::Backward => "selective_scan backward",
    };
    Ok(BenchRow {
        op: op.into(),
        dtype,
        shape: format!("B{} D{} L{} N{}", shape.batch, shape.dim, shape.len, shape.dstate),
        device: device.to_string(),
        timing,
        bytes,
        flops: 0.0,
        copy_gbs,
        target_us: scan_target_us(shape, pass, dtype),
        peak_extra_bytes,
    })
}

/// Benchmarks one decoding step (`selective_state_update`) at `batch`, D = 1536, N = 16, with
/// time-varying B and C, D, z, dt_bias and softplus; states rotate among copies (up to 16,
/// or as many as exceed ~150 MB).
pub fn bench_scan_step(
    device: &Device,
    dtype: DType,
    batch: usize,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    use crate::ops::selective_scan::{selective_state_update, StepInputs};
    let (dim, n) = (1536usize, 16usize);
    let state_bytes = batch * dim * n * 4;
    let sets = if device.is_cuda() { (150_000_000 / state_bytes.max(1)).clamp(2, 16) } else { 1 };
    let mut rng = Rng::new(0xDEC0);
    let mut gen =
        |count: usize, lo: f64, hi: f64| -> Vec<f32> { (0..count).map(|_| rng.uniform(lo, hi) as f32).collect() };
    let t = |v: Vec<f32>, shape: &[usize], dt: DType| Tensor::from_f32(&v, shape, dt, device);
    let x = t(gen(batch * dim, -1.0, 1.0), &[batch, dim], dtype)?;
    let dt = t(gen(batch * dim, -2.0, 1.0), &[batch, dim], dtype)?;
    let z = t(gen(batch * dim, -2.0, 2.0), &[batch, dim], dtype)?;
    let a = t(gen(dim * n, -16.0, -0.5), &[dim, n], DType::F32)?;
    let b = t(gen(batch * n, -1.0, 1.0), &[batch, 1, n], dtype)?;
    let c = t(gen(batch * n, -1.0, 1.0), &[batch, 1, n], dtype)?;
    let d = t(gen(dim, -1.0, 1.0), &[dim], DType::F32)?;
    let bias = t(gen(dim, -3.0, -0.5), &[dim], DType::F32)?;
    let mut states = (0..sets)
        .map(|_| t(gen(batch * dim * n, -1.0, 1.0), &[batch, dim, n], DType::F32))
        .collect::<Result<Vec<_>>>()?;
    let inputs = StepInputs {
        d: Some(&d),
        z: Some(&z),
        dt_bias: Some(&bias),
        dt_softplus: true,
        ..StepInputs::new(&x, &dt, &a, &b, &c)
    };
    let mut step = |i: usize| -> Result<()> { selective_state_update(&mut states[i % sets], &inputs).map(drop) };
    let timing = match device {
        Device::Cuda(dev) => time_cuda(dev, reps, &mut step)?,
        Device::Cpu => time_host(Repeats { warmup: 0, iters: reps.iters.min(3) }, &mut step)?,
    };
    let es = dtype.size_in_bytes() as f64;
    let bytes = 2.0 * state_bytes as f64
        + 4.0 * (batch * dim) as f64 * es
        + 2.0 * (batch * n) as f64 * es
        + (dim * n * 4) as f64;
    Ok(BenchRow {
        op: "selective_state_update".into(),
        dtype,
        shape: format!("B{batch} D{dim} N{n}"),
        device: device.to_string(),
        timing,
        bytes,
        flops: 0.0,
        copy_gbs,
        target_us: None,
        peak_extra_bytes: None,
    })
}

/// Which part of the causal conv1d a row times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPass {
    Forward,
    Backward,
}

/// Benchmarks the causal conv1d as Mamba calls it (width 4, bias, SiLU) at `(batch, dim,
/// len)`. Two input sets rotate: at the scan's shape B=8 D=1536 L=2048 one set (x and dout)
/// is ~100 MB in bf16, twice L2.
pub fn bench_conv(
    device: &Device,
    pass: ConvPass,
    dtype: DType,
    (batch, dim, len): (usize, usize, usize),
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    use crate::check::ConvCase;
    use crate::ops::causal_conv1d::{causal_conv1d, causal_conv1d_backward};
    let case = ConvCase::from_option_bits(batch, dim, len, 4, 0b11, dtype);
    let n = batch * dim * len;
    let sets = if device.is_cuda() { 2 } else { 1 };
    let mut rng = Rng::new(0xC0411);
    let mut data = Vec::with_capacity(sets);
    for _ in 0..sets {
        let t = case.tensors(&mut rng)?.to_device(device)?;
        let dout: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        data.push((t, Tensor::from_f32(&dout, &[batch, dim, len], dtype, device)?));
    }
    let step = |i: usize| -> Result<()> {
        let (t, dout) = &data[i % sets];
        match pass {
            ConvPass::Forward => drop(causal_conv1d(&t.inputs())?),
            ConvPass::Backward => drop(causal_conv1d_backward(&t.inputs(), dout, None)?),
        }
        Ok(())
    };
    let timing = time_on(device, reps, step)?;
    let es = dtype.size_in_bytes() as f64;
    // Forward: read x, write out. Backward: read x and dout, write dx.
    let bytes = match pass {
        ConvPass::Forward => 2.0 * n as f64 * es,
        ConvPass::Backward => 3.0 * n as f64 * es,
    };
    Ok(BenchRow {
        op: match pass {
            ConvPass::Forward => "causal_conv1d forward".into(),
            ConvPass::Backward => "causal_conv1d backward".into(),
        },
        dtype,
        shape: format!("B{batch} D{dim} L{len} W4"),
        device: device.to_string(),
        timing,
        bytes,
        flops: 0.0,
        copy_gbs,
        target_us: None,
        peak_extra_bytes: None,
    })
}

/// Benchmarks one decoding update (`causal_conv1d_update`, one token, width 4, bias, SiLU) at
/// `batch`, D = 1536 (the scan's); states rotate among copies (up to 16, or as many as exceed ~150 MB).
pub fn bench_conv_step(
    device: &Device,
    dtype: DType,
    batch: usize,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    use crate::ops::causal_conv1d::causal_conv1d_update;
    let (dim, width) = (1536usize, 4usize);
    let es = dtype.size_in_bytes();
    let state_bytes = batch * dim * (width - 1) * es;
    let sets = if device.is_cuda() { (150_000_000 / state_bytes.max(1)).clamp(2, 16) } else { 1 };
    let mut rng = Rng::new(0xC0DE);
    let mut gen = |count: usize| -> Vec<f32> { (0..count).map(|_| rng.uniform(-1.0, 1.0) as f32).collect() };
    let x = Tensor::from_f32(&gen(batch * dim), &[batch, dim], dtype, device)?;
    let weight = Tensor::from_f32(&gen(dim * width), &[dim, width], DType::F32, device)?;
    let bias = Tensor::from_f32(&gen(dim), &[dim], DType::F32, device)?;
    let mut states = (0..sets)
        .map(|_| Tensor::from_f32(&gen(batch * dim * (width - 1)), &[batch, dim, width - 1], dtype, device))
        .collect::<Result<Vec<_>>>()?;
    let mut step = |i: usize| -> Result<()> {
        causal_conv1d_update(&mut states[i % sets], &x, &weight, Some(&bias), true).map(drop)
    };
    let timing = match device {
        Device::Cuda(dev) => time_cuda(dev, reps, &mut step)?,
        Device::Cpu => time_host(Repeats { warmup: 0, iters: reps.iters.min(3) }, &mut step)?,
    };
    let bytes = 2.0 * state_bytes as f64 + 2.0 * (batch * dim * es) as f64 + (dim * (width + 1) * 4) as f64;
    Ok(BenchRow {
        op: "causal_conv1d_update".into(),
        dtype,
        shape: format!("B{batch} D{dim} W{width}"),
        device: device.to_string(),
        timing,
        bytes,
        flops: 0.0,
        copy_gbs,
        target_us: None,
        peak_extra_bytes: None,
    })
}

/// A standard mLSTM benchmark shape: batch, heads, sequence length, head dimension (dqk =
/// dhv).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlstmShape {
    pub batch: usize,
    pub heads: usize,
    pub len: usize,
    pub head_dim: usize,
}

impl MlstmShape {
    pub const D128: MlstmShape = MlstmShape { batch: 8, heads: 16, len: 4096, head_dim: 128 };
    pub const D256: MlstmShape = MlstmShape { batch: 8, heads: 8, len: 4096, head_dim: 256 };
}

/// The targets (H100, bf16): forward 400 µs at D128, 600 µs at D256.
pub fn mlstm_target_us(shape: MlstmShape, dtype: DType) -> Option<f64> {
    match (shape, dtype) {
        (MlstmShape::D128, DType::BF16) => Some(400.0),
        (MlstmShape::D256, DType::BF16) => Some(600.0),
        _ => None,
    }
}

/// Benchmarks the mLSTM forward (`mlstm`, no initial state) at `shape`, chunk `chunk` (None:
/// the default); two input sets rotate on the GPU.
pub fn bench_mlstm(
    device: &Device,
    dtype: DType,
    shape: MlstmShape,
    chunk: Option<usize>,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    use crate::check::MlstmCase;
    use crate::ops::mlstm::mlstm;
    let MlstmShape { batch, heads, len, head_dim: d } = shape;
    let case = MlstmCase { chunk, ..MlstmCase::new(batch, heads, len, d, d, dtype) };
    let sets = if device.is_cuda() { 2 } else { 1 };
    let mut rng = Rng::new(0x3157);
    let data = (0..sets).map(|_| case.tensors(&mut rng)?.to_device(device)).collect::<Result<Vec<_>>>()?;
    let timing = time_on(device, reps, |i| mlstm(&data[i % sets].inputs()).map(drop))?;
    let tokens = (batch * heads * len) as f64;
    let (es, d) = (dtype.size_in_bytes() as f64, d as f64);
    // Read q, k, v and the gates; write h.
    let bytes = tokens * (4.0 * d * es + 8.0);
    // Causal halves of Q K^T and P V per chunk, Q C and K^T V at every step.
    // The CPU reference is the recurrence: its chunk is one step.
    let (l, op) = match device {
        Device::Cuda(dev) => {
            let t = crate::ops::mlstm::forward_tiling(dev, &case_dims(&case), chunk)?;
            let kernel = if t.fused { "fused" } else { "chunked" };
            (t.chunk as f64, format!("mlstm forward ({kernel}, chunk {})", t.chunk))
        }
        Device::Cpu => (1.0, "mlstm forward (recurrent)".to_string()),
    };
    let flops = tokens * (2.0 * l * d + 4.0 * d * d);
    Ok(BenchRow {
        op,
        dtype,
        shape: format!("B{batch} NH{heads} S{len} D{}", shape.head_dim),
        device: device.to_string(),
        timing,
        bytes,
        flops,
        copy_gbs,
        // The targets are for the default configuration; a chosen chunk is a row for
        // comparison (chunk 128 runs the chunked kernel).
        target_us: if chunk.is_none() { mlstm_target_us(shape, dtype) } else { None },
        peak_extra_bytes: None,
    })
}

/// The forward+backward targets (H100, bf16): 1.6 ms at D128, 2.4 ms at D256.
pub fn mlstm_train_target_us(shape: MlstmShape, dtype: DType) -> Option<f64> {
    match (shape, dtype) {
        (MlstmShape::D128, DType::BF16) => Some(1600.0),
        (MlstmShape::D256, DType::BF16) => Some(2400.0),
        _ => None,
    }
}

/// Benchmarks a training step of the mLSTM: `mlstm_for_backward` then `mlstm_backward`
/// (Exact) with its saved forward and a given dh, at `shape`; two input sets rotate on the
/// GPU.
pub fn bench_mlstm_fwd_bwd(
    device: &Device,
    dtype: DType,
    shape: MlstmShape,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    use crate::check::MlstmCase;
    use crate::ops::mlstm::{mlstm_backward, mlstm_for_backward, NormalizerGrad};
    let MlstmShape { batch, heads, len, head_dim: d } = shape;
    let case = MlstmCase::new(batch, heads, len, d, d, dtype);
    let sets = if device.is_cuda() { 2 } else { 1 };
    let mut rng = Rng::new(0x3158);
    let data = (0..sets)
        .map(|_| -> Result<_> {
            let t = case.tensors(&mut rng)?.to_device(device)?;
            let dh: Vec<f32> = (0..batch * heads * len * d).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
            let dh = Tensor::from_f32(&dh, &[batch, heads, len, d], dtype, device)?;
            Ok((t, dh))
        })
        .collect::<Result<Vec<_>>>()?;
    let timing = time_on(device, reps, |i| {
        let (t, dh) = &data[i % sets];
        let saved = mlstm_for_backward(&t.inputs())?;
        mlstm_backward(&t.inputs(), dh, None, NormalizerGrad::Exact, Some(&saved)).map(drop)
    })?;
    let tokens = (batch * heads * len) as f64;
    let (es, df) = (dtype.size_in_bytes() as f64, d as f64);
    // The backward runs the forward again unless the saved one carries its stats.
    let forwards = if mlstm_for_backward(&data[0].0.inputs())?.has_stats() { 1.0 } else { 2.0 };
    // Forward: q, k, v, gates in, h out. Backward: three passes reading three operands each
    // and writing dq, dk, dv, and the gate kernels.
    let bytes = tokens * (4.0 * df * es + 8.0) * forwards + tokens * (12.0 * df * es + 32.0);
    let l = match device {
        Device::Cuda(dev) => crate::ops::mlstm::forward_tiling(dev, &case_dims(&case), None)?.chunk as f64,
        Device::Cpu => 1.0,
    };
    // The forwards and three passes of the forward's work.
    let flops = (forwards + 3.0) * tokens * (2.0 * l * df + 4.0 * df * df);
    Ok(BenchRow {
        op: "mlstm forward+backward".to_string(),
        dtype,
        shape: format!("B{batch} NH{heads} S{len} D{d}"),
        device: device.to_string(),
        timing,
        bytes,
        flops,
        copy_gbs,
        target_us: mlstm_train_target_us(shape, dtype),
        peak_extra_bytes: None,
    })
}

fn case_dims(case: &crate::check::MlstmCase) -> crate::ops::mlstm::MlstmDims {
    crate::ops::mlstm::MlstmDims {
        batch: case.batch,
        heads: case.heads,
        len: case.len,
        dqk: case.dqk,
        dhv: case.dhv,
        dtype: case.dtype,
    }
}

/// Benchmarks one decoding step (`mlstm_step`) at `batch` x 16 heads, head dim 128; states
/// rotate among copies (up to 16, or as many as exceed ~150 MB).
pub fn bench_mlstm_step(
    device: &Device,
    dtype: DType,
    batch: usize,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    use crate::check::MlstmCase;
    use crate::ops::mlstm::{mlstm_step, DEFAULT_EPS};
    let (heads, d) = (16, 128);
    let state_bytes = batch * heads * (d * d + d + 1) * 4;
    let sets = if device.is_cuda() { (150_000_000 / state_bytes).clamp(2, 16) } else { 1 };
    let case = MlstmCase { with_init: true, ..MlstmCase::new(batch, heads, 1, d, d, dtype) };
    let mut rng = Rng::new(0x57E9);
    let mut data = Vec::with_capacity(sets);
    for _ in 0..sets {
        let t = case.tensors(&mut rng)?.to_device(device)?;
        let shape_qk = [batch, heads, d];
        let q = t.q.clone().reshape(&shape_qk)?;
        let k = t.k.clone().reshape(&shape_qk)?;
        let v = t.v.clone().reshape(&shape_qk)?;
        let i = t.i.clone().reshape(&[batch, heads])?;
        let f = t.f.clone().reshape(&[batch, heads])?;
        let state = t.initial.clone().ok_or_else(|| Error::invalid("state", "an initial state", "none"))?;
        data.push((state, q, k, v, i, f));
    }
    let timing = time_on(device, reps, |n| {
        let (state, q, k, v, i, f) = &mut data[n % sets];
        mlstm_step(state, q, k, v, i, f, DEFAULT_EPS).map(drop)
    })?;
    let es = dtype.size_in_bytes() as f64;
    let hb = (batch * heads) as f64;
    let dd = d as f64;
    // Read and write C, n, m; read q, k, v and the gates; write h.
    let bytes = hb * (2.0 * 4.0 * (dd * dd + dd + 1.0) + 4.0 * dd * es + 8.0);
    Ok(BenchRow {
        op: "mlstm_step (decode)".into(),
        dtype,
        shape: format!("B{batch} NH{heads} D{d}"),
        device: device.to_string(),
        timing,
        bytes,
        flops: hb * 4.0 * dd * dd,
        copy_gbs,
        target_us: None,
        peak_extra_bytes: None,
    })
}
