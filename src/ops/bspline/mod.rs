//! B-spline basis evaluation for KAN layers, with efficient-kan's `b_splines` semantics.
//!
//! For input `x` of shape `(..., in)` and a [`KnotGrid`] of `in` knot vectors with
//! `n_knots = G + 2k + 1` knots each (uniform or not), [`bspline_basis`] returns the
//! `(..., in, G + k)` B-spline bases of order `k` (Cox–de Boor), and
//! [`bspline_basis_derivative`] their derivatives with respect to `x`.
//!
//! Conventions, the same on the CPU and the GPU:
//! - bases are zero outside `[t_0, t_last)` (so ±inf give zeros); the half-open
//!   intervals make `x == t_last` outside, as in efficient-kan;
//! - a zero-width knot span (repeated knots) contributes 0 where efficient-kan would
//!   compute 0/0 = NaN; with distinct knots the two agree;
//! - `x = NaN` gives NaN for all bases (and derivatives) of that element;
//! - the derivative at a knot is the one-sided derivative from the right.
//!
//! Storage types f32, bf16, f16 for `x` and the output; knots are f32; arithmetic is f32
//! on the GPU and f64 on the CPU (the reference in [`cpu`]).

pub mod bench;
pub mod check;
pub(crate) mod cli;
pub mod cpu;
pub(crate) mod cuda;

/// The B-spline ops in the CLI's `check`, `bench basis` and `run`.
pub const ENTRY: crate::ops::registry::OpEntry = crate::ops::registry::OpEntry {
    name: "bspline",
    bench_group: "basis",
    check: check::check_rows,
    bench: bench::bench_rows,
    run: cli::COMMANDS,
};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{elem_count, Tensor};

/// The highest spline order the kernels are instantiated for.
pub const MAX_SPLINE_ORDER: usize = 7;

/// Validated knot vectors: f32, shape `(in_features, n_knots)`, every value finite and
/// each row non-decreasing, with at least one basis (`n_knots >= order + 2`).
#[derive(Clone, Debug)]
pub struct KnotGrid {
    knots: Tensor,
    order: usize,
    uniform: bool,
}

impl KnotGrid {
    /// efficient-kan's grid: `G + 2k + 1` uniformly spaced knots per feature, `k`
    /// extensions beyond `range` on each side (`arange(-k, G + k + 1) * h + lo`,
    /// `h = (hi - lo) / G`, computed in f64 and rounded to f32).
    pub fn uniform(
        in_features: usize,
        grid_size: usize,
        order: usize,
        range: (f32, f32),
        device: &Device,
    ) -> Result<KnotGrid> {
        check_order(order)?;
        if grid_size == 0 {
            return Err(Error::invalid("grid_size", "at least 1 interval", "0"));
        }
        if in_features == 0 {
            return Err(Error::invalid("in_features", "at least 1", "0"));
        }
        let (lo, hi) = range;
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err(Error::invalid("range", "finite (lo, hi) with lo < hi", format!("({lo}, {hi})")));
        }
        let n_knots = grid_size.checked_add(2 * order + 1).ok_or_else(|| {
            Error::invalid("grid_size", "grid_size + 2 order + 1 knots in usize", grid_size.to_string())
        })?;
        let total = n_knots.checked_mul(in_features).ok_or_else(|| {
            Error::invalid("in_features", "in_features x n_knots in usize", format!("{in_features} x {n_knots}"))
        })?;
        crate::memory::check_host::<f32>("grid_size", n_knots)?;
        crate::memory::check_host::<f32>("in_features", total)?;
        let h = (hi as f64 - lo as f64) / grid_size as f64;
        let row = crate::memory::host_collect(
            "grid_size",
            n_knots,
            (0..n_knots).map(|i| ((i as f64 - order as f64) * h + lo as f64) as f32),
        )?;
        let knots = crate::memory::host_collect("in_features", total, row.iter().copied().cycle().take(total))?;
        KnotGrid::from_knots(&Tensor::from_vec(knots, &[in_features, n_knots], device)?, order)
    }

    /// Validates user knots (copied to the host once for the check; grids are small).
    pub fn from_knots(knots: &Tensor, order: usize) -> Result<KnotGrid> {
        check_order(order)?;
        knots.expect_dtype("knots", DType::F32)?;
        let &[in_features, n_knots] = knots.shape() else {
            return Err(Error::invalid(
                "knots",
                "a 2-D (in_features, n_knots) tensor",
                format!("shape {:?}", knots.shape()),
            ));
        };
        if in_features == 0 {
            return Err(Error::invalid("knots", "at least one feature (row)", "0 rows"));
        }
        if n_knots < order + 2 {
            return Err(Error::invalid(
                "knots",
                format!("at least order + 2 = {} knots per feature for spline order {order}", order + 2),
                format!("{n_knots}"),
            ));
        }
        let values = knots.to_vec::<f32>()?;
        if let Some((index, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFinite { arg: "knots", index, value: *v as f64 });
        }
        for (f, row) in values.chunks_exact(n_knots).enumerate() {
            if let Some(j) = row.windows(2).position(|w| w[1] < w[0]) {
                return Err(Error::invalid(
                    "knots",
                    "non-decreasing knots in every row",
                    format!("row {f}: knot {} = {} < knot {} = {}", j + 1, row[j + 1], j, row[j]),
                ));
            }
        }
        let uniform = values.chunks_exact(n_knots).all(is_uniform_row);
        Ok(KnotGrid { knots: knots.clone(), order, uniform })
    }

    /// Whether every feature's knots are uniformly spaced: each knot within `1e-6 h` of
    /// `t_0 + a h`, `h = (t_last - t_0) / (n_knots - 1) > 0`. The kernels then evaluate
    /// bases as polynomials of `(x - t_s) / h` (no knot loads or divisions per basis);
    /// the interval `s` still comes from the knots themselves, so inputs on a knot land
    /// where they do on any grid. Grids from [`KnotGrid::uniform`] qualify for ranges and
    /// sizes in common use (e.g. `(-1, 1)`, `G <= 20`); f32 rounding of larger or
    /// finer grids can exceed the bound, and those take the general path.
    pub fn is_uniform(&self) -> bool {
        self.uniform
    }

    pub fn order(&self) -> usize {
        self.order
    }

    pub fn in_features(&self) -> usize {
        self.knots.shape()[0]
    }

    pub fn n_knots(&self) -> usize {
        self.knots.shape()[1]
    }

    /// Bases per feature: `n_knots - 1 - order` (`G + k` for an efficient-kan grid).
    pub fn n_bases(&self) -> usize {
        self.n_knots() - 1 - self.order
    }

    pub fn knots(&self) -> &Tensor {
        &self.knots
    }

    pub fn device(&self) -> Device {
        self.knots.device()
    }

    /// The same grid on `device` (already validated; no re-check).
    pub fn to_device(&self, device: &Device) -> Result<KnotGrid> {
        Ok(KnotGrid { knots: self.knots.to_device(device)?, order: self.order, uniform: self.uniform })
    }
}

/// See [`KnotGrid::is_uniform`]. Knots beyond 1e30 in magnitude never count as uniform, so
/// that `t_last - t_0` stays finite in f32 on the device.
fn is_uniform_row(t: &[f32]) -> bool {
    let n = t.len();
    let (t0, tl) = (t[0] as f64, t[n - 1] as f64);
    let h = (tl - t0) / (n - 1) as f64;
    if !(h > 0.0 && t0.abs() < 1e30 && tl.abs() < 1e30) {
        return false;
    }
    t.iter().enumerate().all(|(a, &v)| (v as f64 - (t0 + a as f64 * h)).abs() <= 1e-6 * h)
}

fn check_order(order: usize) -> Result<()> {
    if order > MAX_SPLINE_ORDER {
        return Err(Error::invalid("order", format!("a spline order in 0..={MAX_SPLINE_ORDER}"), order.to_string()));
    }
    Ok(())
}

/// Which quantity to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BasisKind {
    /// `B_j(x)`
    Value,
    /// `dB_j/dx (x)`
    Derivative,
}

/// The B-spline bases of `x` (`(..., in)`) on `grid`: shape `(..., in, n_bases)`, same
/// element type and device as `x`.
pub fn bspline_basis(x: &Tensor, grid: &KnotGrid) -> Result<Tensor> {
    evaluate(BasisKind::Value, x, grid)
}

/// The derivatives with respect to `x` of the bases of [`bspline_basis`].
pub fn bspline_basis_derivative(x: &Tensor, grid: &KnotGrid) -> Result<Tensor> {
    evaluate(BasisKind::Derivative, x, grid)
}

/// [`bspline_basis`] into a caller-provided output (shape `(..., in, n_bases)`, the
/// element type and device of `x`); every element of `out` is written.
pub fn bspline_basis_into(x: &Tensor, grid: &KnotGrid, out: &mut Tensor) -> Result<()> {
    evaluate_into(BasisKind::Value, x, grid, out)
}

/// [`bspline_basis_derivative`] into a caller-provided output.
pub fn bspline_basis_derivative_into(x: &Tensor, grid: &KnotGrid, out: &mut Tensor) -> Result<()> {
    evaluate_into(BasisKind::Derivative, x, grid, out)
}

/// Checked sizes of one evaluation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BasisDims {
    /// Leading elements of x: product of all dims but the last, times in_features.
    pub rows: usize,
    pub in_features: usize,
    pub n_knots: usize,
    pub n_bases: usize,
    pub order: usize,
}

fn check_inputs(x: &Tensor, grid: &KnotGrid) -> Result<(BasisDims, Vec<usize>)> {
    let Some(&last) = x.shape().last() else {
        return Err(Error::invalid("x", "a tensor of shape (..., in_features) with rank >= 1", "a scalar (rank 0)"));
    };
    if last != grid.in_features() {
        return Err(Error::invalid(
            "x",
            format!("last dimension = in_features of the grid = {}", grid.in_features()),
            format!("shape {:?}", x.shape()),
        ));
    }
    x.expect_device("grid", &grid.device()).map_err(|_| Error::DeviceMismatch {
        arg: "grid",
        expected: x.device().to_string(),
        found: grid.device().to_string(),
    })?;
    let mut out_shape = x.shape().to_vec();
    out_shape.push(grid.n_bases());
    elem_count("output", &out_shape)?;
    let dims = BasisDims {
        rows: x.elem_count(),
        in_features: grid.in_features(),
        n_knots: grid.n_knots(),
        n_bases: grid.n_bases(),
        order: grid.order(),
    };
    Ok((dims, out_shape))
}

fn evaluate(kind: BasisKind, x: &Tensor, grid: &KnotGrid) -> Result<Tensor> {
    let (dims, out_shape) = check_inputs(x, grid)?;
    // The output is n_bases times larger than x: a few MiB of x against a fine grid can ask
    // for terabytes.
    let count = dims.rows.checked_mul(dims.n_bases);
    crate::memory::check_buffers(&x.device(), &[("x", count, x.dtype().size_in_bytes())])?;
    match x.device() {
        Device::Cpu => cpu::evaluate(kind, x, grid, dims, out_shape),
        Device::Cuda(dev) => {
            let mut out = cuda::alloc_output(&dev, x.dtype(), out_shape)?;
            cuda::evaluate_into(kind, &dev, x, grid, dims, &mut out)?;
            Ok(out)
        }
    }
}

fn evaluate_into(kind: BasisKind, x: &Tensor, grid: &KnotGrid, out: &mut Tensor) -> Result<()> {
    let (dims, out_shape) = check_inputs(x, grid)?;
    out.expect_shape("out", &out_shape)?;
    out.expect_dtype("out", x.dtype())?;
    out.expect_device("out", &x.device())?;
    match x.device() {
        Device::Cpu => {
            *out = cpu::evaluate(kind, x, grid, dims, out_shape)?;
            Ok(())
        }
        Device::Cuda(dev) => cuda::evaluate_into(kind, &dev, x, grid, dims, out),
    }
}
