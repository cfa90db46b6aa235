//! The causal conv1d's bench rows.

use super::check::ConvCase;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::timing::{time_cuda, time_host, time_on, BenchContext, BenchRow, Repeats};

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
    Ok(BenchRow::memory_bound(
        match pass {
            ConvPass::Forward => "causal_conv1d forward".into(),
            ConvPass::Backward => "causal_conv1d backward".into(),
        },
        dtype,
        format!("B{batch} D{dim} L{len} W4"),
        device,
        timing,
        bytes,
        copy_gbs,
    ))
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
    Ok(BenchRow::memory_bound(
        "causal_conv1d_update".into(),
        dtype,
        format!("B{batch} D{dim} W{width}"),
        device,
        timing,
        bytes,
        copy_gbs,
    ))
}

/// `bench conv`: forward and backward at the scan's shape (Mamba's conv runs on the same
/// (batch, inner dim, len) tensor; 1x16x256 on the CPU), then the decode update at batch 1,
/// 64, 256 (64 only in the short table).
pub fn bench_rows(ctx: &BenchContext) -> Result<Vec<BenchRow>> {
    let (device, reps, short) = (ctx.device, ctx.reps, ctx.short);
    let shape = if device.is_cuda() { (8, 1536, 2048) } else { (1, 16, 256) };
    let mut rows = Vec::new();
    for pass in [ConvPass::Forward, ConvPass::Backward] {
        for &dtype in ctx.dtypes() {
            rows.push(bench_conv(device, pass, dtype, shape, reps, ctx.copy_gbs)?);
        }
    }
    for batch in [1usize, 64, 256] {
        if short && batch != 64 {
            continue;
        }
        for dtype in [DType::BF16, DType::F32] {
            rows.push(bench_conv_step(device, dtype, batch, reps, ctx.copy_gbs)?);
        }
    }
    Ok(rows)
}
