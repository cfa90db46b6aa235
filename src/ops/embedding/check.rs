//! The embedding's check cases: the gather exactly (a copy), and the scatter-add into an
//! existing gradient against the f64 sums, measured against the sizes of the summed terms (f32
//! sums of up to a few hundred terms: 1e-6 relative), with ids repeated many times.

use super::{cpu, embedding, embedding_backward};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::measure::{scaled_error, CheckRow};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::tokens::TokenIds;

/// The tolerance of the gradient (f32 sums); the forward must be exact.
pub const EMBEDDING_TOLERANCE: f64 = 1e-6;

/// One random case: `tokens` ids drawn from `distinct` of a `vocab` x `dim` table.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingCase {
    pub tokens: usize,
    pub vocab: usize,
    pub distinct: usize,
    pub dim: usize,
    pub dtype: DType,
}

impl EmbeddingCase {
    /// The gradient's error on `device`; a forward that is not an exact copy is infinite.
    pub fn run(&self, seed: u64, device: &Device) -> Result<f64> {
        let mut rng = Rng::new(seed);
        let table: Vec<f32> = (0..self.vocab * self.dim).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let pool: Vec<i32> = (0..self.distinct).map(|_| (rng.next_u64() % self.vocab as u64) as i32).collect();
        let ids: Vec<i32> = (0..self.tokens).map(|_| pool[(rng.next_u64() % pool.len() as u64) as usize]).collect();
        let dout: Vec<f32> = (0..self.tokens * self.dim).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let start: Vec<f32> = (0..self.vocab * self.dim).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let table = Tensor::from_f32(&table, &[self.vocab, self.dim], self.dtype, device)?;
        let tokens = TokenIds::new(&ids, &[self.tokens], device)?;
        let dout = Tensor::from_f32(&dout, &[self.tokens, self.dim], self.dtype, device)?;
        let mut dtable = Tensor::from_f32(&start, &[self.vocab, self.dim], DType::F32, device)?;

        let out = embedding(&table, &tokens)?;
        let want = cpu::forward(&table.to_f64_vec()?, &ids, self.dim);
        if out.to_f64_vec()? != want {
            return Ok(f64::INFINITY);
        }
        let groups = cpu::group_by_id(&ids);
        let mut want = dtable.to_f64_vec()?;
        cpu::backward(&mut want, &groups, &dout.to_f64_vec()?, self.dim);
        let mut magnitude: Vec<f64> = dtable.to_f64_vec()?.iter().map(|v| v.abs()).collect();
        let abs_dout: Vec<f64> = dout.to_f64_vec()?.iter().map(|v| v.abs()).collect();
        cpu::backward(&mut magnitude, &groups, &abs_dout, self.dim);
        embedding_backward(&mut dtable, &tokens, &dout)?;
        Ok(scaled_error(&dtable.to_f64_vec()?, &want, &magnitude))
    }
}

/// `check`'s embedding rows per dtype: odd widths (scalar path), ids repeated up to hundreds of
/// times, a GPT-2-sized table.
pub fn check_rows(device: &Device, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    let cases: &[(usize, usize, usize, usize)] =
        &[(1, 1, 1, 1), (33, 7, 3, 33), (1025, 100, 5, 64), (4096, 50304, 4000, 768), (300, 1000, 2, 8)];
    let mut rows = Vec::new();
    for dtype in DType::ALL {
        let mut worst = 0.0f64;
        for &(tokens, vocab, distinct, dim) in cases {
            let case = EmbeddingCase { tokens, vocab, distinct, dim, dtype };
            worst = worst.max(case.run(rng.next_u64(), device)?);
        }
        rows.push(CheckRow {
            kernel: "embedding fwd+dtable",
            dtype,
            cases: cases.len(),
            worst,
            tolerance: EMBEDDING_TOLERANCE,
        });
    }
    Ok(rows)
}
