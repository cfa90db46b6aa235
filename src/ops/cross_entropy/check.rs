//! The cross-entropy's check cases: per-token losses, the mean, the hit count and the gradient
//! against the f64 reference on the same rounded logits, with ignored targets, soft-cap and a
//! gradient scale. Losses and the mean are f32 results of sums over the vocabulary (exp and log
//! in f32: 1e-5 relative); the gradient is rounded once into the logits' type.

use super::{cpu, cross_entropy, cross_entropy_fused, CrossEntropyOptions};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::measure::{relative_error, relative_error_in, rounding_tolerance, CheckRow};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::tokens::TokenIds;

/// The tolerance of the losses and gradient for logits in `dtype`.
pub fn cross_entropy_tolerance(dtype: DType) -> f64 {
    rounding_tolerance(dtype, 2.0, 2e-5)
}

/// One random case: `rows` tokens over `vocab`, logits of spread `spread`, every fifth target
/// ignored.
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropyCase {
    pub rows: usize,
    pub vocab: usize,
    pub dtype: DType,
    pub spread: f64,
    pub softcap: Option<f32>,
}

impl CrossEntropyCase {
    /// The worst error on `device`; a wrong hit count is an error of 1.
    pub fn run(&self, seed: u64, device: &Device) -> Result<f64> {
        let mut rng = Rng::new(seed);
        let n = self.rows * self.vocab;
        let x: Vec<f32> = (0..n).map(|_| rng.uniform(-self.spread, self.spread) as f32).collect();
        let ids: Vec<i32> = (0..self.rows)
            .map(|r| if r % 5 == 4 { -100 } else { (rng.next_u64() % self.vocab as u64) as i32 })
            .collect();
        let shape = [self.rows, self.vocab];
        let logits = Tensor::from_f32(&x, &shape, self.dtype, device)?;
        let targets = TokenIds::new(&ids, &[self.rows], device)?;
        let opts = CrossEntropyOptions { softcap: self.softcap, grad_scale: 0.75, ..Default::default() };
        let r = cpu::cross_entropy(&logits.to_f64_vec()?, &ids, self.vocab, &opts);
        let eval = cross_entropy(&logits, &targets, opts)?;
        let mut grad = logits.clone();
        let fused = cross_entropy_fused(&mut grad, &targets, opts)?;
        let mut worst = relative_error(&eval.losses.to_f64_vec()?, &r.losses)
            .max(relative_error(&fused.losses.to_f64_vec()?, &r.losses))
            .max(relative_error(&[f64::from(fused.mean_loss()?)], &[r.mean]))
            .max(relative_error_in(&grad.to_f64_vec()?, &r.dlogits, self.dtype));
        // The evaluation leaves the logits alone.
        if logits.to_f64_vec()? != Tensor::from_f32(&x, &shape, self.dtype, &Device::Cpu)?.to_f64_vec()? {
            worst = f64::INFINITY;
        }
        if fused.correct()? != r.correct || eval.correct()? != r.correct {
            worst = worst.max(1.0);
        }
        Ok(worst)
    }
}

/// `check`'s cross-entropy rows per dtype: odd vocabularies (scalar path), GPT-2's padded 50304
/// and larger, with and without soft-cap.
pub fn check_rows(device: &Device, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    let cases: &[(usize, usize, f64, Option<f32>)] = &[
        (1, 1, 1.0, None),
        (7, 33, 3.0, None),
        (33, 1000, 8.0, Some(5.0)),
        (5, 50304, 4.0, None),
        (3, 65543, 20.0, Some(30.0)),
    ];
    let mut rows = Vec::new();
    for dtype in DType::ALL {
        let mut worst = 0.0f64;
        for &(r, vocab, spread, softcap) in cases {
            let case = CrossEntropyCase { rows: r, vocab, dtype, spread, softcap };
            worst = worst.max(case.run(rng.next_u64(), device)?);
        }
        rows.push(CheckRow {
            kernel: "cross_entropy loss+dlogits",
            dtype,
            cases: cases.len(),
            worst,
            tolerance: cross_entropy_tolerance(dtype),
        });
    }
    Ok(rows)
}
