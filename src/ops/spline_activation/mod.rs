//! A learnable per-channel B-spline activation, the middle arm between an MLP (fixed
//! activation) and a KAN (a spline per edge): after a linear layer, channel `c` applies
//!
//! `phi_c(x) = sum_j coeff[c, j] B_j(x) + w[c] SiLU(x)`  (the SiLU term optional)
//!
//! with `B_j` the B-spline bases of [`crate::ops::bspline`] on channel `c`'s knot vector.
//! `x` is `(..., C)`. Forward, and backward to `dx`, `dcoeff`, `dw`; f32, bf16, f16 storage
//! with f32 arithmetic on the GPU; the CPU backend is the f64 reference ([`cpu`]). The
//! parameter gradients are summed over rows deterministically (fixed order, no atomics).

pub mod bench;
pub mod check;
pub(crate) mod cli;
pub mod cpu;
mod cuda;

/// The B-spline activation in the CLI's `check`, `bench activation` and `run`.
pub const ENTRY: crate::ops::registry::OpEntry = crate::ops::registry::OpEntry {
    name: "spline_activation",
    bench_group: "activation",
    check: check::check_rows,
    bench: bench::bench_rows,
    run: cli::COMMANDS,
};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::bspline::{KnotGrid, MAX_SPLINE_ORDER};
use crate::ops::kan::fit;
use crate::tensor::Tensor;

/// A per-channel B-spline activation; parameters on one device in one element type.
#[derive(Clone, Debug)]
pub struct SplineActivation {
    grid: KnotGrid,
    coeff: Tensor,
    base_weight: Option<Tensor>,
}

/// Gradients of `sum(forward(x) * dy)`.
#[derive(Clone, Debug)]
pub struct ActivationGrads {
    pub dx: Tensor,
    pub coeff: Tensor,
    pub base_weight: Option<Tensor>,
}

impl SplineActivation {
    /// `channels` activations on efficient-kan-style uniform grids (`grid_size` intervals on
    /// `range`, `order` extensions each side), initialised to SiLU: the spline is the
    /// least-squares fit of SiLU on the grid, or zero when `with_base` adds SiLU itself.
    pub fn new(
        channels: usize,
        grid_size: usize,
        order: usize,
        range: (f32, f32),
        with_base: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<SplineActivation> {
        if order > MAX_SPLINE_ORDER {
            return Err(Error::invalid("order", format!("0..={MAX_SPLINE_ORDER}"), order.to_string()));
        }
        if channels == 0 {
            return Err(Error::invalid("channels", "at least 1", "0"));
        }
        // The SiLU fit samples 64 points per interval (two f64 vectors of them).
        let samples = grid_size.checked_mul(64).and_then(|n| n.checked_add(1)).ok_or_else(|| {
            Error::invalid("grid_size", "64 grid_size + 1 fit samples in usize", grid_size.to_string())
        })?;
        if !with_base {
            crate::memory::check_host::<[f64; 2]>("grid_size", samples)?;
        }
        let grid = KnotGrid::uniform(channels, grid_size, order, range, &Device::Cpu).map_err(|e| match e {
            Error::InvalidArgument { arg: "in_features", expected, found } => {
                Error::InvalidArgument { arg: "channels", expected, found }
            }
            Error::HostOutOfMemory { arg: "in_features", requested_bytes, available_bytes } => {
                Error::HostOutOfMemory { arg: "channels", requested_bytes, available_bytes }
            }
            e => e,
        })?;
        let nb = grid.n_bases();
        // channels * n_knots fitted in KnotGrid::uniform, so this product does too.
        crate::memory::check_host::<f64>("channels", channels * nb)?;
        let coeff: Vec<f64> = if with_base {
            vec![0.0; channels * nb]
        } else {
            let knots = grid.knots().to_f64_vec()?;
            let t = &knots[..grid.n_knots()];
            // Samples on the grid range [t_k, t_{G+k}] only: towards the outer knots every
            // basis vanishes, no spline can follow SiLU there, and fitting those points would
            // distort the interior.
            let (lo, hi) = (t[order], t[order + grid_size]);
            let xs: Vec<f64> = (0..samples).map(|q| lo + (hi - lo) * q as f64 / (samples - 1) as f64).collect();
            let ys: Vec<f64> = xs.iter().map(|&x| crate::ops::kan::cpu::silu(x)).collect();
            let one = fit::fit_feature(&xs, &ys, 1, t, order);
            one.iter().copied().cycle().take(channels * nb).collect()
        };
        let to = |v: &[f64], shape: &[usize]| {
            let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Tensor::from_f32(&f, shape, dtype, device)
        };
        let base = if with_base { Some(to(&vec![1.0; channels], &[channels])?) } else { None };
        SplineActivation::from_parameters(grid.to_device(device)?, to(&coeff, &[channels, nb])?, base)
    }

    /// From existing parameters: `coeff` `(C, n_bases)`, `base_weight` `(C)`, on the grid's
    /// device, in one element type.
    pub fn from_parameters(grid: KnotGrid, coeff: Tensor, base_weight: Option<Tensor>) -> Result<SplineActivation> {
        let (c, nb) = (grid.in_features(), grid.n_bases());
        coeff.expect_shape("coeff", &[c, nb])?;
        coeff.expect_device("coeff", &grid.device())?;
        if let Some(w) = &base_weight {
            w.expect_shape("base_weight", &[c])?;
            w.expect_dtype("base_weight", coeff.dtype())?;
            w.expect_device("base_weight", &grid.device())?;
        }
        Ok(SplineActivation { grid, coeff, base_weight })
    }

    pub fn channels(&self) -> usize {
        self.grid.in_features()
    }
    pub fn grid(&self) -> &KnotGrid {
        &self.grid
    }
    pub fn coeff(&self) -> &Tensor {
        &self.coeff
    }
    pub fn base_weight(&self) -> Option<&Tensor> {
        self.base_weight.as_ref()
    }
    pub fn dtype(&self) -> DType {
        self.coeff.dtype()
    }
    pub fn device(&self) -> Device {
        self.coeff.device()
    }

    pub fn to_device(&self, device: &Device) -> Result<SplineActivation> {
        Ok(SplineActivation {
            grid: self.grid.to_device(device)?,
            coeff: self.coeff.to_device(device)?,
            base_weight: self.base_weight.as_ref().map(|w| w.to_device(device)).transpose()?,
        })
    }

    fn check(&self, arg: &'static str, t: &Tensor) -> Result<usize> {
        if t.shape().last() != Some(&self.channels()) {
            return Err(Error::invalid(
                arg,
                format!("shape (..., {}) (channels)", self.channels()),
                format!("shape {:?}", t.shape()),
            ));
        }
        t.expect_dtype(arg, self.dtype())?;
        t.expect_device(arg, &self.device())?;
        Ok(t.elem_count() / self.channels())
    }

    pub fn params64(&self) -> Result<cpu::ActParams64> {
        Ok(cpu::ActParams64 {
            channels: self.channels(),
            n_knots: self.grid.n_knots(),
            order: self.grid.order(),
            knots: self.grid.knots().to_f64_vec()?,
            coeff: self.coeff.to_f64_vec()?,
            base_weight: self.base_weight.as_ref().map(|w| w.to_f64_vec()).transpose()?,
        })
    }

    /// `phi(x)`, the shape of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = self.check("x", x)?;
        match self.device() {
            Device::Cpu => {
                Tensor::from_f64_rounded(&cpu::forward(&self.params64()?, &x.to_f64_vec()?), x.shape(), self.dtype())
            }
            Device::Cuda(dev) => cuda::forward(self, &dev, x, rows),
        }
    }

    /// Gradients of `sum(forward(x) * dy)`; `dy` has the shape of `x`.
    pub fn backward(&self, x: &Tensor, dy: &Tensor) -> Result<ActivationGrads> {
        let rows = self.check("x", x)?;
        self.check("dy", dy)?;
        dy.expect_shape("dy", x.shape())?;
        match self.device() {
            Device::Cpu => {
                let (dx, dc, dw) = cpu::backward(&self.params64()?, &x.to_f64_vec()?, &dy.to_f64_vec()?);
                let dt = self.dtype();
                Ok(ActivationGrads {
                    dx: Tensor::from_f64_rounded(&dx, x.shape(), dt)?,
                    coeff: Tensor::from_f64_rounded(&dc, self.coeff.shape(), dt)?,
                    base_weight: dw.map(|w| Tensor::from_f64_rounded(&w, &[self.channels()], dt)).transpose()?,
                })
            }
            Device::Cuda(dev) => cuda::backward(self, &dev, x, dy, rows),
        }
    }
}
