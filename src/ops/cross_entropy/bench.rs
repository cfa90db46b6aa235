//! The cross-entropy's bench rows: 16384 tokens over GPT-2's padded vocabulary (50304), fused
//! (loss and dlogits in place) and evaluation only, with and without xLSTM-7B's soft-cap 30.

use super::{cross_entropy, cross_entropy_fused, CrossEntropyOptions};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::timing::{time_on, BenchContext, BenchRow, Repeats};
use crate::tokens::TokenIds;

/// Times the fused pass (or the evaluation) on `rows` x `vocab` logits, rotated over sets
/// whose total exceeds L2. The fused pass overwrites its logits; timing it on gradients
/// instead of logits changes no memory traffic and, with no early exits, no work.
#[allow(clippy::too_many_arguments)]
pub fn bench_cross_entropy(
    device: &Device,
    fused: bool,
    softcap: Option<f32>,
    dtype: DType,
    rows: usize,
    vocab: usize,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    let mut rng = Rng::new(0xce);
    // One set: 16384 x 50304 logits are 30 times the L2 (rotating would only cost host time).
    let sets = if device.is_cuda() && rows * vocab * dtype.size_in_bytes() < (64 << 20) { 3 } else { 1 };
    let ids: Vec<i32> = (0..rows).map(|_| (rng.next_u64() % vocab as u64) as i32).collect();
    let targets = TokenIds::new(&ids, &[rows], device)?;
    let mut data = Vec::with_capacity(sets);
    for _ in 0..sets {
        let x: Vec<f32> = (0..rows * vocab).map(|_| rng.uniform(-4.0, 4.0) as f32).collect();
        data.push(Tensor::from_f32(&x, &[rows, vocab], dtype, device)?);
    }
    let opts = CrossEntropyOptions { softcap, ..Default::default() };
    let mut step = |i: usize| -> Result<()> {
        let logits = &mut data[i % sets];
        if fused {
            cross_entropy_fused(logits, &targets, opts)?;
        } else {
            cross_entropy(logits, &targets, opts)?;
        }
        Ok(())
    };
    let timing = time_on(device, reps, &mut step)?;
    let n = (rows * vocab) as f64;
    let es = dtype.size_in_bytes() as f64;
    let bytes = if fused { 2.0 * n * es } else { n * es };
    let cap = if softcap.is_some() { " softcap" } else { "" };
    let op = format!("cross_entropy {}{cap}", if fused { "fused" } else { "eval" });
    Ok(BenchRow::memory_bound(op, dtype, format!("{rows}x{vocab}"), device, timing, bytes, copy_gbs))
}

/// `bench cross_entropy`: 16384 x 50304 (64 rows on the CPU) bf16 fused, fused with soft-cap,
/// evaluation; f32 fused in the full table.
pub fn bench_rows(ctx: &BenchContext) -> Result<Vec<BenchRow>> {
    let rows_n = if ctx.device.is_cuda() { 16384 } else { 64 };
    let mut rows = Vec::new();
    for (fused, softcap, dtype) in [
        (true, None, DType::BF16),
        (true, Some(30.0), DType::BF16),
        (false, None, DType::BF16),
        (true, None, DType::F32),
    ] {
        if ctx.short && dtype == DType::F32 {
            continue;
        }
        rows.push(bench_cross_entropy(ctx.device, fused, softcap, dtype, rows_n, 50304, ctx.reps, ctx.copy_gbs)?);
    }
    Ok(rows)
}
