//! The norms' bench rows: language-model shapes, 16384 tokens of width 768, 2048 and 4096, for
//! RMSNorm, LayerNorm with bias, and the fused residual add + RMSNorm of Mamba's blocks.

use super::{add_norm, add_norm_backward, norm, norm_backward, Norm, DEFAULT_EPS};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::timing::{time_on, BenchContext, BenchRow, Repeats};

/// Which norm a row times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormBench {
    /// RMSNorm, no bias.
    Rms,
    /// LayerNorm with a bias.
    Layer,
    /// `add_norm`: bf16 x plus an f32 residual, RMSNorm, the f32 sum written.
    AddRms,
}

impl NormBench {
    fn name(self) -> &'static str {
        match self {
            NormBench::Rms => "rms_norm",
            NormBench::Layer => "layer_norm",
            NormBench::AddRms => "add_rms_norm",
        }
    }

    /// Bytes the forward (and with `backward` the backward too) must move per element of x.
    fn bytes_per_element(self, dtype: DType, backward: bool) -> f64 {
        let es = dtype.size_in_bytes() as f64;
        match (self, backward) {
            // read x, write y; backward: read x and dy, write dx.
            (NormBench::Rms | NormBench::Layer, false) => 2.0 * es,
            (NormBench::Rms | NormBench::Layer, true) => 5.0 * es,
            // read x and the residual, write y and the sum; backward: read the sum, dy and
            // the residual gradient, write dx and dresidual.
            (NormBench::AddRms, false) => 2.0 * es + 8.0,
            (NormBench::AddRms, true) => 4.0 * es + 20.0,
        }
    }
}

/// Times the forward (or forward + backward) on `rows` x `dim`, inputs rotated over sets
/// whose total exceeds L2.
#[allow(clippy::too_many_arguments)]
pub fn bench_norm(
    device: &Device,
    which: NormBench,
    backward: bool,
    dtype: DType,
    rows: usize,
    dim: usize,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    let mut rng = Rng::new(0x125);
    // Rotated sets only where one set would sit in L2 (50 MB on an H200).
    let sets = if device.is_cuda() && rows * dim * dtype.size_in_bytes() < (64 << 20) { 4 } else { 1 };
    let mut vector = |lo: f64, hi: f64, n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform(lo, hi) as f32).collect() };
    let w = Tensor::from_f32(&vector(0.5, 1.5, dim), &[dim], DType::F32, device)?;
    let b = Tensor::from_f32(&vector(-0.5, 0.5, dim), &[dim], DType::F32, device)?;
    let bias = (which == NormBench::Layer).then_some(&b);
    let spec = match which {
        NormBench::Layer => Norm::layer(DEFAULT_EPS),
        _ => Norm::rms(DEFAULT_EPS),
    };
    let shape = [rows, dim];
    let mut sets_in = Vec::with_capacity(sets);
    for _ in 0..sets {
        let x = Tensor::from_f32(&vector(-2.0, 2.0, rows * dim), &shape, dtype, device)?;
        let dy = Tensor::from_f32(&vector(-1.0, 1.0, rows * dim), &shape, dtype, device)?;
        let (residual, dres) = if which == NormBench::AddRms {
            (
                Some(Tensor::from_f32(&vector(-2.0, 2.0, rows * dim), &shape, DType::F32, device)?),
                Some(Tensor::from_f32(&vector(-1.0, 1.0, rows * dim), &shape, DType::F32, device)?),
            )
        } else {
            (None, None)
        };
        sets_in.push((x, dy, residual, dres));
    }
    let step = |i: usize| -> Result<()> {
        let (x, dy, residual, dres) = &sets_in[i % sets];
        if which == NormBench::AddRms {
            let o = add_norm(x, residual.as_ref(), &w, bias, spec)?;
            if backward {
                add_norm_backward(&o.residual, &w, bias, &o.stats, dy, dres.as_ref())?;
            }
        } else {
            let o = norm(x, &w, bias, spec)?;
            if backward {
                norm_backward(x, &w, bias, &o.stats, dy)?;
            }
        }
        Ok(())
    };
    let timing = time_on(device, reps, step)?;
    let pass = if backward { "fwd+bwd" } else { "forward" };
    let bytes = which.bytes_per_element(dtype, backward) * (rows * dim) as f64;
    Ok(BenchRow::memory_bound(
        format!("{} {pass}", which.name()),
        dtype,
        format!("{rows}x{dim}"),
        device,
        timing,
        bytes,
        copy_gbs,
    ))
}

/// `bench norm`: forward and forward + backward of each norm in bf16 (and f32 at d 2048) at
/// 16384 tokens (64 on the CPU); the short table only d 2048.
pub fn bench_rows(ctx: &BenchContext) -> Result<Vec<BenchRow>> {
    let rows_n = if ctx.device.is_cuda() { 16384 } else { 64 };
    let mut rows = Vec::new();
    for which in [NormBench::Rms, NormBench::Layer, NormBench::AddRms] {
        for backward in [false, true] {
            for (dtype, dim) in [(DType::BF16, 768), (DType::BF16, 2048), (DType::BF16, 4096), (DType::F32, 2048)] {
                if ctx.short && dim != 2048 {
                    continue;
                }
                rows.push(bench_norm(ctx.device, which, backward, dtype, rows_n, dim, ctx.reps, ctx.copy_gbs)?);
            }
        }
    }
    Ok(rows)
}
