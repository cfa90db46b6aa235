//! The B-spline activation's bench rows.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::timing::{time_cuda, time_host, BenchContext, BenchRow, Repeats};

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
    Ok(BenchRow::memory_bound(
        if backward { "spline_activation fwd+bwd".into() } else { "spline_activation forward".into() },
        dtype,
        format!("{rows}x{channels} G={grid_size} k={order}"),
        device,
        timing,
        bytes,
        copy_gbs,
    ))
}

/// `bench activation`: forward and forward+backward, bf16 and f32, on 4096 rows x 1024
/// channels, G = 5, k = 3 (64 x 256 on the CPU).
pub fn bench_rows(ctx: &BenchContext) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for backward in [false, true] {
        for dtype in [DType::BF16, DType::F32] {
            let (rows_n, channels) = if ctx.device.is_cuda() { (4096, 1024) } else { (64, 256) };
            rows.push(bench_activation(ctx.device, backward, dtype, rows_n, channels, 5, 3, ctx.reps, ctx.copy_gbs)?);
        }
    }
    Ok(rows)
}
