//! The embedding's bench rows: 16384 tokens from GPT-2's padded vocabulary (50304) at widths
//! 768 and 2048, the gather and the scatter-add into the f32 gradient.

use super::{embedding, embedding_backward};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::timing::{time_on, BenchContext, BenchRow, Repeats};
use crate::tokens::TokenIds;

/// Times the gather (or the backward) of `tokens` random ids from a `vocab` x `dim` table.
#[allow(clippy::too_many_arguments)]
pub fn bench_embedding(
    device: &Device,
    backward: bool,
    dtype: DType,
    tokens: usize,
    vocab: usize,
    dim: usize,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    let mut rng = Rng::new(0xe3b);
    let sets = if device.is_cuda() { 3 } else { 1 };
    let table: Vec<f32> = (0..vocab * dim).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
    let table = Tensor::from_f32(&table, &[vocab, dim], dtype, device)?;
    let mut dtable = Tensor::full(0.0, &[vocab, dim], DType::F32, device)?;
    let mut data = Vec::with_capacity(sets);
    for _ in 0..sets {
        let ids: Vec<i32> = (0..tokens).map(|_| (rng.next_u64() % vocab as u64) as i32).collect();
        let ids = TokenIds::new(&ids, &[tokens], device)?;
        let dout: Vec<f32> = (0..tokens * dim).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        data.push((ids, Tensor::from_f32(&dout, &[tokens, dim], dtype, device)?));
    }
    let mut step = |i: usize| -> Result<()> {
        let (ids, dout) = &data[i % sets];
        if backward {
            embedding_backward(&mut dtable, ids, dout)
        } else {
            embedding(&table, ids).map(drop)
        }
    };
    let timing = time_on(device, reps, &mut step)?;
    let n = (tokens * dim) as f64;
    let es = dtype.size_in_bytes() as f64;
    // Gather: read and write a row per token. Backward: read dout, read and write the touched
    // f32 rows (about every token's id is distinct at 16384 of 50304). The ids' grouping is
    // computed once per TokenIds (the first backward of a batch, here in the warm-up), as in
    // training, where the batch's ids are known before its backward.
    let bytes = if backward { n * es + 2.0 * 4.0 * n } else { 2.0 * n * es };
    let op = if backward { "embedding backward" } else { "embedding forward" };
    Ok(BenchRow::memory_bound(op.into(), dtype, format!("{tokens}x{dim} of {vocab}"), device, timing, bytes, copy_gbs))
}

/// `bench embedding`: bf16, 16384 tokens (64 on the CPU), widths 768 and 2048.
pub fn bench_rows(ctx: &BenchContext) -> Result<Vec<BenchRow>> {
    let tokens = if ctx.device.is_cuda() { 16384 } else { 64 };
    let dims: &[usize] = if ctx.short { &[768] } else { &[768, 2048] };
    let mut rows = Vec::new();
    for backward in [false, true] {
        for &dim in dims {
            rows.push(bench_embedding(ctx.device, backward, DType::BF16, tokens, 50304, dim, ctx.reps, ctx.copy_gbs)?);
        }
    }
    Ok(rows)
}
