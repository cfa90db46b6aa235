//! The B-spline ops' check cases: random knot grids (uniform, non-uniform, with repeated
//! knots) and inputs on, between and outside the knots, against the f64 reference.
//!
//! Tolerance ([`tolerance`]): the kernels evaluate in f32 and round each basis once to the
//! storage type, so the error is the f32 arithmetic error (1e-6 for the value; 1e-5 for the
//! derivative, which subtracts two terms of size ~k/h) plus one rounding of the output,
//! allowed twice.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::measure::{rounding_tolerance, tensor_error, CheckRow};
use crate::ops::bspline::{self, BasisKind, KnotGrid};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// How the knot vectors of a random case are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GridLayout {
    /// A uniform grid on a random range, with dyadic start and spacing so that every knot
    /// is exact in f32 ([`KnotGrid::is_uniform`](crate::ops::bspline::KnotGrid::is_uniform)
    /// holds: the kernels' uniform path).
    Uniform,
    /// Random positive spacings, different per feature.
    NonUniform,
    /// Non-uniform with some interior knots repeated (zero-width spans).
    Repeated,
}

/// Random knots of `layout`: `(in_features, grid_size + 2 * order + 1)`, f32, row-major.
pub fn random_knots(rng: &mut Rng, in_features: usize, grid_size: usize, order: usize, layout: GridLayout) -> Vec<f32> {
    let n_knots = grid_size + 2 * order + 1;
    let mut out = Vec::with_capacity(in_features * n_knots);
    for _ in 0..in_features {
        let lo = rng.uniform(-3.0, 0.0);
        match layout {
            GridLayout::Uniform => {
                // Multiples of 1/64 below 2^10: exact in f32.
                let lo = -(rng.below(193) as f64) / 64.0;
                let h = (4 + rng.below(61)) as f64 / 64.0;
                out.extend((0..n_knots).map(|i| (lo + i as f64 * h) as f32));
            }
            GridLayout::NonUniform | GridLayout::Repeated => {
                let mut t = lo;
                let mut row = Vec::with_capacity(n_knots);
                for i in 0..n_knots {
                    row.push(t as f32);
                    let repeat = layout == GridLayout::Repeated && i > 0 && i + 2 < n_knots && rng.below(4) == 0;
                    t += if repeat { 0.0 } else { rng.uniform(0.02, 1.0) };
                }
                out.extend(row);
            }
        }
    }
    out
}

/// Random inputs for the rows of `knots`: mostly inside the grid, some exactly on a
/// knot, some outside it (including exactly the last knot, which is outside).
pub fn random_inputs(rng: &mut Rng, batch: usize, knots: &[f32], n_knots: usize) -> Vec<f32> {
    let in_features = knots.len() / n_knots;
    let mut x = Vec::with_capacity(batch * in_features);
    for _ in 0..batch {
        for f in 0..in_features {
            let t = &knots[f * n_knots..(f + 1) * n_knots];
            let (lo, hi) = (t[0] as f64, t[n_knots - 1] as f64);
            let v = match rng.below(10) {
                0 => t[rng.below(n_knots)] as f64,
                1 => {
                    if rng.below(2) == 0 {
                        lo - rng.uniform(0.0, 2.0)
                    } else {
                        hi + rng.uniform(0.0, 2.0) * rng.below(2) as f64
                    }
                }
                _ => rng.uniform(lo, hi),
            };
            x.push(v as f32);
        }
    }
    x
}

/// The tolerance of [`BasisCase::run`]'s error for one op and element type.
pub fn tolerance(kind: BasisKind, dtype: DType) -> f64 {
    let f32_arithmetic = match kind {
        BasisKind::Value => 1e-6,
        BasisKind::Derivative => 1e-5,
    };
    rounding_tolerance(dtype, 2.0, f32_arithmetic)
}

/// One random B-spline case run on `device` against the f64 reference.
#[derive(Clone, Debug)]
pub struct BasisCase {
    pub batch: usize,
    pub in_features: usize,
    pub grid_size: usize,
    pub order: usize,
    pub layout: GridLayout,
    pub dtype: DType,
    pub kind: BasisKind,
}

impl BasisCase {
    /// Runs the case on `device` with fresh inputs from `rng`, the output NaN-poisoned
    /// first; returns the relative error against the f64 reference.
    pub fn run(&self, rng: &mut Rng, device: &Device) -> Result<f64> {
        let knots = random_knots(rng, self.in_features, self.grid_size, self.order, self.layout);
        let n_knots = self.grid_size + 2 * self.order + 1;
        let x = random_inputs(rng, self.batch, &knots, n_knots);
        let grid =
            KnotGrid::from_knots(&Tensor::from_vec(knots.clone(), &[self.in_features, n_knots], device)?, self.order)?;
        if self.layout == GridLayout::Uniform && !grid.is_uniform() {
            // The case would not exercise the uniform row phase it is meant to.
            return Err(Error::invalid("knots", "a grid with is_uniform()", "is_uniform() = false"));
        }
        let xt = Tensor::from_f32(&x, &[self.batch, self.in_features], self.dtype, device)?;
        let mut out = Tensor::full(f32::NAN, &[self.batch, self.in_features, grid.n_bases()], self.dtype, device)?;
        match self.kind {
            BasisKind::Value => bspline::bspline_basis_into(&xt, &grid, &mut out)?,
            BasisKind::Derivative => bspline::bspline_basis_derivative_into(&xt, &grid, &mut out)?,
        }
        // The reference sees exactly the values the kernel saw: x rounded to its dtype.
        let x_rounded = xt.to_f64_vec()?;
        let knots64: Vec<f64> = knots.iter().map(|&v| v as f64).collect();
        let reference = bspline::cpu::evaluate_f64(self.kind, &x_rounded, &knots64, n_knots, self.order);
        tensor_error(&out, &reference)
    }
}

/// `check`'s B-spline rows: both ops in every dtype over odd sizes, every order and all
/// grid layouts.
pub fn check_rows(device: &Device, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    // (batch, in, G, k, layout)
    let cases: &[(usize, usize, usize, usize, GridLayout)] = &[
        (1, 1, 1, 0, GridLayout::Uniform),
        (7, 33, 5, 3, GridLayout::Uniform),
        (33, 7, 3, 1, GridLayout::NonUniform),
        (1025, 33, 20, 3, GridLayout::NonUniform),
        (64, 100, 5, 2, GridLayout::Repeated),
        (17, 1025, 7, 4, GridLayout::NonUniform),
        (5, 64, 100, 5, GridLayout::Uniform),
        (3, 9, 4, 7, GridLayout::NonUniform),
        // More than 128 bases per row: the kernel's row-broadcast write path.
        (5, 7, 300, 3, GridLayout::NonUniform),
    ];
    let mut rows = Vec::new();
    for kind in [BasisKind::Value, BasisKind::Derivative] {
        for dtype in DType::ALL {
            let mut worst = 0.0f64;
            for &(batch, in_features, grid_size, order, layout) in cases {
                let case = BasisCase { batch, in_features, grid_size, order, layout, dtype, kind };
                worst = worst.max(case.run(rng, device)?);
            }
            let kernel = if kind == BasisKind::Value { "bspline_basis" } else { "bspline_basis_derivative" };
            rows.push(CheckRow { kernel, dtype, cases: cases.len(), worst, tolerance: tolerance(kind, dtype) });
        }
    }
    Ok(rows)
}
