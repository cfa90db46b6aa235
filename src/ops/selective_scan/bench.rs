//! The selective scan's bench shapes, targets and rows.

use super::check::ScanCase;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::timing::{time_cuda, time_host, time_on, BenchContext, BenchRow, Repeats};

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
    Ok(BenchRow::memory_bound(
        "selective_state_update".into(),
        dtype,
        format!("B{batch} D{dim} N{n}"),
        device,
        timing,
        bytes,
        copy_gbs,
    ))
}

/// `bench scan`: forward, training forward and backward at the shape in every dtype,
/// forward and backward in bf16 at the other shapes (full table), and the decode step at
/// batch 1, 64, 256 (64 only in the short table). On the CPU one shrunken shape.
pub fn bench_rows(ctx: &BenchContext) -> Result<Vec<BenchRow>> {
    let (device, reps, short) = (ctx.device, ctx.reps, ctx.short);
    let mut rows = Vec::new();
    for (i, &shape) in SCAN_SHAPES.iter().enumerate() {
        // The f64 CPU reference is far too slow for these shapes: scale them down there.
        let shape = if device.is_cuda() { shape } else { ScanShape { batch: 1, dim: 16, len: 256, ..shape } };
        let main_shape = i == 0;
        if short && !main_shape {
            continue;
        }
        let passes: &[ScanPass] = if main_shape {
            &[ScanPass::Forward, ScanPass::ForwardForBackward, ScanPass::Backward]
        } else {
            &[ScanPass::Forward, ScanPass::Backward]
        };
        let dtypes: &[DType] = if main_shape { &[DType::BF16, DType::F32, DType::F16] } else { &[DType::BF16] };
        for &pass in passes {
            for &dtype in dtypes {
                rows.push(bench_scan(device, pass, dtype, shape, reps, ctx.copy_gbs)?);
            }
        }
        if !device.is_cuda() {
            break;
        }
    }
    for batch in [1usize, 64, 256] {
        if short && batch != 64 {
            continue;
        }
        for dtype in [DType::BF16, DType::F32] {
            rows.push(bench_scan_step(device, dtype, batch, reps, ctx.copy_gbs)?);
        }
    }
    Ok(rows)
}
