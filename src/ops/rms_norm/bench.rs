//! RMSNorm's bench rows: language-model shapes, 16384 tokens of width 768, 2048 and 4096.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::timing::{time_cuda, time_host, BenchContext, BenchRow, Repeats};

/// Times the forward (or forward + backward) on `rows` x `dim`, inputs rotated over sets
/// whose total exceeds L2.
pub fn bench_rms_norm(
    device: &Device,
    backward: bool,
    dtype: DType,
    rows: usize,
    dim: usize,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    use super::{rms_norm, rms_norm_backward, DEFAULT_EPS};
    let mut rng = Rng::new(0x125);
    let sets = if device.is_cuda() { 4 } else { 1 };
    let w: Vec<f32> = (0..dim).map(|_| rng.uniform(0.5, 1.5) as f32).collect();
    let w = Tensor::from_f32(&w, &[dim], DType::F32, device)?;
    let mut inputs = Vec::with_capacity(sets);
    for _ in 0..sets {
        let x: Vec<f32> = (0..rows * dim).map(|_| rng.uniform(-2.0, 2.0) as f32).collect();
        let dy: Vec<f32> = (0..rows * dim).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let xt = Tensor::from_f32(&x, &[rows, dim], dtype, device)?;
        let rstd = rms_norm(&xt, &w, DEFAULT_EPS)?.rstd;
        inputs.push((xt, Tensor::from_f32(&dy, &[rows, dim], dtype, device)?, rstd));
    }
    let step = |i: usize| -> Result<()> {
        let (x, dy, rstd) = &inputs[i % sets];
        rms_norm(x, &w, DEFAULT_EPS)?;
        if backward {
            rms_norm_backward(x, &w, rstd, dy)?;
        }
        Ok(())
    };
    let timing = match device {
        Device::Cuda(dev) => time_cuda(dev, reps, step)?,
        Device::Cpu => time_host(Repeats { warmup: 0, iters: reps.iters.min(3) }, step)?,
    };
    let (n, es) = ((rows * dim) as f64, dtype.size_in_bytes() as f64);
    // forward: read x, write y; backward: read x, dy, write dx (weight, rstd, partials small).
    let bytes = if backward { 5.0 * n * es } else { 2.0 * n * es };
    Ok(BenchRow {
        op: if backward { "rms_norm fwd+bwd".into() } else { "rms_norm forward".into() },
        dtype,
        shape: format!("{rows}x{dim}"),
        device: device.to_string(),
        timing,
        bytes,
        flops: 0.0,
        copy_gbs,
        target_us: None,
        peak_extra_bytes: None,
    })
}

/// `bench norm`: forward and forward + backward in bf16 (and f32 at d 2048) at 16384 tokens
/// (64 on the CPU).
pub fn bench_rows(ctx: &BenchContext) -> Result<Vec<BenchRow>> {
    let rows_n = if ctx.device.is_cuda() { 16384 } else { 64 };
    let mut rows = Vec::new();
    for backward in [false, true] {
        for (dtype, dim) in [(DType::BF16, 768), (DType::BF16, 2048), (DType::BF16, 4096), (DType::F32, 2048)] {
            if ctx.short && dim != 2048 {
                continue;
            }
            rows.push(bench_rms_norm(ctx.device, backward, dtype, rows_n, dim, ctx.reps, ctx.copy_gbs)?);
        }
    }
    Ok(rows)
}
