//! The norms' check cases: y, the residual sum, mean, rstd, dx, dresidual, dweight and dbias
//! against the f64 reference on the same rounded inputs; the gradients against the sizes of the
//! terms they sum ([`super::cpu::magnitudes`]), since dx cancels where a group is one large
//! value. y and dx are rounded once into the element type from f32 arithmetic (sums over `dim`
//! terms); the statistics, the residual sum and the parameter gradients are f32 results.
//! Tolerance: two roundings of the element type (one, allowed twice) plus 2e-5 for the f32 sums.

use super::{NormDims, NormKind};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::measure::{relative_error_in, rounding_tolerance, scaled_error, CheckRow};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The tolerance of every norm output in `dtype` (see the module notes).
pub fn norm_tolerance(dtype: DType) -> f64 {
    rounding_tolerance(dtype, 2.0, 2e-5)
}

/// One random norm case: `rows` rows of `groups` groups of `dim`, values across a few orders
/// of magnitude and offset from zero (so LayerNorm's mean matters).
#[derive(Clone, Copy, Debug)]
pub struct NormCase {
    pub rows: usize,
    pub groups: usize,
    pub dim: usize,
    pub dtype: DType,
    pub kind: NormKind,
    pub bias: bool,
    /// The fused residual add ([`super::add_norm`]) with an f32 residual and a residual gradient.
    pub residual: bool,
}

impl NormCase {
    /// The worst error over every output and gradient on `device`.
    pub fn run(&self, seed: u64, device: &Device) -> Result<f64> {
        use super::{add_norm, add_norm_backward, cpu, norm, norm_backward, Norm};
        let mut rng = Rng::new(seed);
        let width = self.groups * self.dim;
        let n = self.rows * width;
        // Each group its own scale (1e-3 .. 1e3) and offset, so rstd spans six orders of magnitude.
        let scales: Vec<(f64, f64)> = (0..self.rows * self.groups)
            .map(|_| {
                let s = 10f64.powf(rng.uniform(-3.0, 3.0));
                (s, s * rng.uniform(-2.0, 2.0))
            })
            .collect();
        let mut vals = |scale: bool| -> Vec<f32> {
            (0..n)
                .map(|e| {
                    let (s, o) = if scale { scales[e / self.dim] } else { (1.0, 0.0) };
                    (rng.uniform(-1.0, 1.0) * s + o) as f32
                })
                .collect()
        };
        let (x, res, dy, dres) = (vals(true), vals(true), vals(false), vals(false));
        let mut rng = Rng::new(seed ^ 0x9e37);
        let w: Vec<f32> = (0..width).map(|_| rng.uniform(-2.0, 2.0) as f32).collect();
        let b: Vec<f32> = (0..width).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let shape = [self.rows, width];
        let xt = Tensor::from_f32(&x, &shape, self.dtype, device)?;
        let rt = Tensor::from_f32(&res, &shape, DType::F32, device)?;
        let wt = Tensor::from_f32(&w, &[width], DType::F32, device)?;
        let bt = Tensor::from_f32(&b, &[width], DType::F32, device)?;
        let dyt = Tensor::from_f32(&dy, &shape, self.dtype, device)?;
        let drt = Tensor::from_f32(&dres, &shape, DType::F32, device)?;
        let bias = self.bias.then_some(&bt);
        let spec = match self.kind {
            NormKind::Rms => Norm::rms(super::DEFAULT_EPS),
            NormKind::Layer => Norm::layer(super::DEFAULT_EPS),
        }
        .grouped(self.groups);

        let d = NormDims { rows: self.rows, groups: self.groups, dim: self.dim, dtype: self.dtype };
        let (x64, w64, dy64) = (xt.to_f64_vec()?, wt.to_f64_vec()?, dyt.to_f64_vec()?);
        let b64 = self.bias.then(|| bt.to_f64_vec()).transpose()?;
        let (r64, dr64) = if self.residual { (Some(rt.to_f64_vec()?), Some(drt.to_f64_vec()?)) } else { (None, None) };
        let eps = f64::from(super::DEFAULT_EPS);
        let z64 = match &r64 {
            Some(r) => cpu::residual_sum(&x64, r),
            None => x64.clone(),
        };
        let f = cpu::forward(&z64, &w64, b64.as_deref(), &d, self.kind, eps);
        let mean_ref = (self.kind == NormKind::Layer).then_some(&f.mean[..]);
        let g_ref = cpu::backward(&f.z, &w64, mean_ref, &f.rstd, &dy64, dr64.as_deref(), &d);
        let mag = cpu::magnitudes(&f.z, &w64, mean_ref, &f.rstd, &dy64, dr64.as_deref(), &d);

        let (y, z, stats, g) = if self.residual {
            let o = add_norm(&xt, Some(&rt), &wt, bias, spec)?;
            let g = add_norm_backward(&o.residual, &wt, bias, &o.stats, &dyt, Some(&drt))?;
            (o.y, Some(o.residual), o.stats, g)
        } else {
            let o = norm(&xt, &wt, bias, spec)?;
            let g = norm_backward(&xt, &wt, bias, &o.stats, &dyt)?;
            (o.y, None, o.stats, g)
        };
        let mut errors = vec![
            relative_error_in(&y.to_f64_vec()?, &f.y, self.dtype),
            relative_error_in(&stats.rstd.to_f64_vec()?, &f.rstd, DType::F32),
            scaled_error(&g.dx.to_f64_vec()?, &g_ref.dz, &mag.dz),
            scaled_error(&g.dweight.to_f64_vec()?, &g_ref.dweight, &mag.dweight),
        ];
        if let Some(m) = &stats.mean {
            // The mean against the group's spread (it cancels when the offset is small).
            let spread: Vec<f64> = f.rstd.iter().map(|s| 1.0 / s).collect();
            errors.push(scaled_error(&m.to_f64_vec()?, &f.mean, &spread));
        }
        if let Some(db) = &g.dbias {
            errors.push(scaled_error(&db.to_f64_vec()?, &g_ref.dbias, &mag.dbias));
        }
        if let Some(z) = &z {
            errors.push(relative_error_in(&z.to_f64_vec()?, &f.z, DType::F32));
        }
        if let Some(dr) = &g.dresidual {
            errors.push(scaled_error(&dr.to_f64_vec()?, &g_ref.dz, &mag.dz));
        }
        Ok(errors.into_iter().fold(0.0, f64::max))
    }
}

/// `check`'s norm rows: per kind and dtype, forward and gradients over odd and model-sized
/// shapes, with bias, with the fused residual add, and grouped.
pub fn check_rows(device: &Device, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    // (rows, groups, dim, bias, residual)
    let cases: &[(usize, usize, usize, bool, bool)] = &[
        (1, 1, 1, false, false),
        (7, 1, 33, true, false),
        (33, 1, 768, false, true),
        (1025, 1, 257, true, true),
        (3, 1, 4100, false, false),
        (5, 4, 64, true, false),
        (9, 3, 7, false, true),
        (2, 1, 12000, true, true),
    ];
    let mut rows = Vec::new();
    for (kind, name) in [(NormKind::Rms, "rms_norm fwd+grads"), (NormKind::Layer, "layer_norm fwd+grads")] {
        for dtype in DType::ALL {
            let mut worst = 0.0f64;
            for &(r, groups, dim, bias, residual) in cases {
                let case = NormCase { rows: r, groups, dim, dtype, kind, bias, residual };
                worst = worst.max(case.run(rng.next_u64(), device)?);
            }
            rows.push(CheckRow { kernel: name, dtype, cases: cases.len(), worst, tolerance: norm_tolerance(dtype) });
        }
    }
    Ok(rows)
}
