//! RMSNorm's check cases: y, rstd, dx and dweight against the f64 reference on the same
//! rounded inputs; the gradients against the sizes of the terms they sum
//! ([`super::cpu::magnitudes`]), since dx cancels where a row is one large value. y and dx are rounded once into the element type from f32 arithmetic
//! (sums over `dim` terms); rstd and dweight are f32 results. Tolerance: two roundings of the
//! element type (one, allowed twice) plus 2e-5 for the f32 sums.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::measure::{relative_error_in, rounding_tolerance, scaled_error, CheckRow};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The tolerance of every RMSNorm output in `dtype` (see the module notes).
pub fn rms_norm_tolerance(dtype: DType) -> f64 {
    rounding_tolerance(dtype, 2.0, 2e-5)
}

/// One random RMSNorm case: `rows` rows of `dim`, values across a few orders of magnitude.
#[derive(Clone, Copy, Debug)]
pub struct RmsNormCase {
    pub rows: usize,
    pub dim: usize,
    pub dtype: DType,
}

impl RmsNormCase {
    /// The worst relative error of y, rstd, dx and dweight on `device`.
    pub fn run(&self, seed: u64, device: &Device) -> Result<f64> {
        use super::{cpu, rms_norm, rms_norm_backward};
        let mut rng = Rng::new(seed);
        let n = self.rows * self.dim;
        // Each row its own scale (1e-3 .. 1e3), so rstd varies over six orders of magnitude.
        let scales: Vec<f64> = (0..self.rows).map(|_| 10f64.powf(rng.uniform(-3.0, 3.0))).collect();
        let x: Vec<f32> = (0..n).map(|e| (rng.uniform(-1.0, 1.0) * scales[e / self.dim]) as f32).collect();
        let w: Vec<f32> = (0..self.dim).map(|_| rng.uniform(-2.0, 2.0) as f32).collect();
        let dy: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let shape = [self.rows, self.dim];
        let xt = Tensor::from_f32(&x, &shape, self.dtype, device)?;
        let wt = Tensor::from_f32(&w, &[self.dim], DType::F32, device)?;
        let dyt = Tensor::from_f32(&dy, &shape, self.dtype, device)?;
        let (x64, w64, dy64) = (xt.to_f64_vec()?, wt.to_f64_vec()?, dyt.to_f64_vec()?);
        let eps = f64::from(super::DEFAULT_EPS);
        let (y_ref, rstd_ref) = cpu::forward(&x64, &w64, self.dim, eps);
        let (dx_ref, dw_ref) = cpu::backward(&x64, &w64, &rstd_ref, &dy64, self.dim);
        let (dx_mag, dw_mag) = cpu::magnitudes(&x64, &w64, &rstd_ref, &dy64, self.dim);
        let o = rms_norm(&xt, &wt, super::DEFAULT_EPS)?;
        let g = rms_norm_backward(&xt, &wt, &o.rstd, &dyt)?;
        Ok([
            relative_error_in(&o.y.to_f64_vec()?, &y_ref, self.dtype),
            relative_error_in(&o.rstd.to_f64_vec()?, &rstd_ref, DType::F32),
            scaled_error(&g.dx.to_f64_vec()?, &dx_ref, &dx_mag),
            scaled_error(&g.dweight.to_f64_vec()?, &dw_ref, &dw_mag),
        ]
        .into_iter()
        .fold(0.0, f64::max))
    }
}

/// `check`'s RMSNorm rows: forward and gradients per dtype over odd and model-sized shapes.
pub fn check_rows(device: &Device, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    let cases: &[(usize, usize)] = &[(1, 1), (7, 33), (33, 768), (1025, 257), (3, 4100)];
    let mut rows = Vec::new();
    for dtype in DType::ALL {
        let mut worst = 0.0f64;
        for &(r, dim) in cases {
            worst = worst.max(RmsNormCase { rows: r, dim, dtype }.run(rng.next_u64(), device)?);
        }
        rows.push(CheckRow {
            kernel: "rms_norm fwd+grads",
            dtype,
            cases: cases.len(),
            worst,
            tolerance: rms_norm_tolerance(dtype),
        });
    }
    Ok(rows)
}
