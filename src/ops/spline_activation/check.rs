//! The B-spline activation's check cases: forward and every gradient against the f64
//! reference, held to KANLinear's tolerance (the same roundings: features, products,
//! intermediate gradients).

use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::measure::{scaled_error, CheckRow};
use crate::ops::bspline::KnotGrid;
use crate::ops::kan::check::kan_tolerance;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// One random B-spline-activation case: forward and every gradient on `device` against the
/// f64 reference ([`scaled_error`]); returns the worst of y, dx, dcoeff and dw.
#[derive(Clone, Debug)]
pub struct ActivationCase {
    pub rows: usize,
    pub channels: usize,
    pub grid_size: usize,
    pub order: usize,
    pub with_base: bool,
    pub dtype: DType,
}

impl ActivationCase {
    pub fn run(&self, seed: u64, device: &Device) -> Result<f64> {
        use crate::ops::spline_activation::{cpu, SplineActivation};
        let mut rng = Rng::new(seed);
        let grid = KnotGrid::uniform(self.channels, self.grid_size, self.order, (-1.0, 1.0), &Device::Cpu)?;
        let nb = grid.n_bases();
        let coeff: Vec<f32> = (0..self.channels * nb).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let coeff = Tensor::from_f32(&coeff, &[self.channels, nb], self.dtype, &Device::Cpu)?;
        let base = if self.with_base {
            let w: Vec<f32> = (0..self.channels).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
            Some(Tensor::from_f32(&w, &[self.channels], self.dtype, &Device::Cpu)?)
        } else {
            None
        };
        let host = SplineActivation::from_parameters(grid, coeff, base)?;
        let act = host.to_device(device)?;
        let n = self.rows * self.channels;
        let x: Vec<f32> = (0..n)
            .map(|_| if rng.below(10) == 0 { rng.uniform(-5.0, 5.0) } else { rng.uniform(-1.5, 1.5) } as f32)
            .collect();
        let dy: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let xt = Tensor::from_f32(&x, &[self.rows, self.channels], self.dtype, device)?;
        let dyt = Tensor::from_f32(&dy, &[self.rows, self.channels], self.dtype, device)?;
        let p = host.params64()?;
        let (x64, dy64) = (xt.to_f64_vec()?, dyt.to_f64_vec()?);
        let y_ref = cpu::forward(&p, &x64);
        let (dx_ref, dc_ref, dw_ref) = cpu::backward(&p, &x64, &dy64);
        let (y_mag, dx_mag, dc_mag, dw_mag) = cpu::magnitudes(&p, &x64, &dy64);
        let y = act.forward(&xt)?.to_f64_vec()?;
        let g = act.backward(&xt, &dyt)?;
        let dw = match (&g.base_weight, &dw_ref, &dw_mag) {
            (Some(a), Some(b), Some(m)) => scaled_error(&a.to_f64_vec()?, b, m),
            (None, None, None) => 0.0,
            _ => f64::INFINITY,
        };
        Ok([
            scaled_error(&y, &y_ref, &y_mag),
            scaled_error(&g.dx.to_f64_vec()?, &dx_ref, &dx_mag),
            scaled_error(&g.coeff.to_f64_vec()?, &dc_ref, &dc_mag),
            dw,
        ]
        .into_iter()
        .fold(0.0, f64::max))
    }
}

/// `check`'s B-spline activation rows: forward and every gradient (worst of y, dx, dcoeff,
/// dw) per dtype.
pub fn check_rows(device: &Device, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    // (rows, channels, G, k, with the SiLU term)
    let cases: &[(usize, usize, usize, usize, bool)] =
        &[(1, 1, 1, 1, false), (33, 7, 5, 3, true), (1025, 33, 20, 2, true), (7, 64, 100, 3, false)];
    let mut rows = Vec::new();
    for dtype in DType::ALL {
        let mut worst = 0.0f64;
        for &(rows, channels, grid_size, order, with_base) in cases {
            let case = ActivationCase { rows, channels, grid_size, order, with_base, dtype };
            worst = worst.max(case.run(rng.next_u64(), device)?);
        }
        let tolerance = kan_tolerance(dtype, false);
        rows.push(CheckRow { kernel: "spline_activation fwd+grads", dtype, cases: cases.len(), worst, tolerance });
    }
    Ok(rows)
}
