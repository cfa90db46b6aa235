//! KANLinear with efficient-kan's semantics:
//!
//! `y = SiLU(x) W_base^T + B(x)_flat (W_spline * scaler)^T`
//!
//! `x` is `(..., in)` (leading dimensions flatten as in efficient-kan), `W_base` is
//! `(out, in)`, `W_spline` is `(out, in, G + k)`, the optional `scaler` is `(out, in)`
//! (efficient-kan's `enable_standalone_scale_spline`), and `B` is the basis of
//! [`crate::ops::bspline`] on the layer's knot grid `(in, G + 2k + 1)`.
//!
//! On a GPU the layer runs SiLU and the basis kernel, then two cuBLAS GEMMs with f32
//! accumulation. The backward recomputes the bases rather than storing them, and writes
//! the basis gradient over the basis buffer, so it holds a single `(batch, in, G + k)`
//! buffer. f32 layers may opt into TF32 tensor cores ([`KanLinear::set_allow_tf32`]).
//! On the CPU every step is the f64 reference ([`cpu`]).
//!
//! Differences from efficient-kan, all deliberate:
//! - [`KanLinear::update_grid`] divides the refit coefficients by the scaler, so the
//!   layer's output is preserved. efficient-kan writes the scaled coefficients into
//!   `spline_weight` and then scales them a second time.
//! - The regularization entropy counts `0 log 0` as 0, where efficient-kan gets NaN.
//! - Repeated knots follow the basis op's convention (0 instead of 0/0).

pub mod bench;
pub mod check;
pub(crate) mod cli;
pub mod cpu;
mod cuda;
mod direct;
pub mod fit;

/// KANLinear in the CLI's `check`, `bench kan` and `run`.
pub const ENTRY: crate::ops::registry::OpEntry = crate::ops::registry::OpEntry {
    name: "kan",
    bench_group: "kan",
    check: check::check_rows,
    bench: bench::bench_rows,
    run: cli::COMMANDS,
};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::bspline::{KnotGrid, MAX_SPLINE_ORDER};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// efficient-kan's `KANLinear.__init__` arguments, with its defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct KanLinearConfig {
    pub in_features: usize,
    pub out_features: usize,
    pub grid_size: usize,
    pub spline_order: usize,
    pub scale_noise: f64,
    pub scale_base: f64,
    pub scale_spline: f64,
    /// efficient-kan's `enable_standalone_scale_spline`: a learnable (out, in) scaler.
    pub standalone_scale_spline: bool,
    pub grid_eps: f64,
    pub grid_range: (f32, f32),
}

impl KanLinearConfig {
    pub fn new(in_features: usize, out_features: usize) -> Self {
        KanLinearConfig {
            in_features,
            out_features,
            grid_size: 5,
            spline_order: 3,
            scale_noise: 0.1,
            scale_base: 1.0,
            scale_spline: 1.0,
            standalone_scale_spline: true,
            grid_eps: 0.02,
            grid_range: (-1.0, 1.0),
        }
    }

    /// `grid_size + spline_order` (saturating: a config whose sum overflows fails
    /// validation before anything uses it).
    pub fn n_bases(&self) -> usize {
        self.grid_size.saturating_add(self.spline_order)
    }

    fn scale_by_name(&self, arg: &str) -> f64 {
        match arg {
            "scale_base" => self.scale_base,
            "scale_spline" => self.scale_spline,
            _ => self.scale_noise,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.in_features == 0 {
            return Err(Error::invalid("in_features", "at least 1", "0"));
        }
        if self.out_features == 0 {
            return Err(Error::invalid("out_features", "at least 1", "0"));
        }
        if self.grid_size == 0 {
            return Err(Error::invalid("grid_size", "at least 1", "0"));
        }
        if self.spline_order > MAX_SPLINE_ORDER {
            return Err(Error::invalid(
                "spline_order",
                format!("0..={MAX_SPLINE_ORDER}"),
                self.spline_order.to_string(),
            ));
        }
        for (arg, v) in
            [("scale_noise", self.scale_noise), ("scale_base", self.scale_base), ("scale_spline", self.scale_spline)]
        {
            if !v.is_finite() {
                return Err(Error::invalid(arg, "a finite number", v.to_string()));
            }
        }
        if !(0.0..=1.0).contains(&self.grid_eps) {
            return Err(Error::invalid("grid_eps", "a number in [0, 1]", self.grid_eps.to_string()));
        }
        // Parameter counts: every size below is then safe to form without overflow, and the
        // largest (the spline weights, or efficient-kan's noise draw at initialisation,
        // both held in f64 on the host while a layer is built) fits in memory.
        let n_knots = self.grid_size.checked_add(2 * self.spline_order + 1);
        let pairs = self.out_features.checked_mul(self.in_features);
        let too_large = |arg| {
            Error::invalid(
                arg,
                "in_features x out_features x (grid_size + spline_order + 1) in usize",
                format!(
                    "{} x {} x ({} + {} + 1)",
                    self.in_features, self.out_features, self.grid_size, self.spline_order
                ),
            )
        };
        let per_pair = n_knots.ok_or_else(|| too_large("grid_size"))?;
        let params = pairs.and_then(|p| p.checked_mul(per_pair)).ok_or_else(|| too_large("out_features"))?;
        crate::memory::check_host::<f64>("grid_size", params)?;
        Ok(())
    }
}

/// Which GPU pipeline [`KanLinear::forward`] runs (the backward always uses the GEMMs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KanForwardPath {
    /// The pipeline measured fastest (docs/performance/kan.md has the numbers):
    /// [`DirectTf32x3`](KanForwardPath::DirectTf32x3) for f32 layers without TF32 that it
    /// covers, up to 4096 rows; [`Gemm`](KanForwardPath::Gemm) otherwise.
    #[default]
    Auto,
    /// Features kernel `[SiLU(x) | B(x)]`, folded weights `[W_base | W_spline * scaler]` and
    /// one cuBLAS GEMM: tensor cores for bf16/f16 (and f32 with TF32).
    Gemm,
    /// `cuda/kan_direct.cu`: reads the weights where they are (no features buffer, no
    /// folded weights, no GEMM), f32 FMAs on CUDA cores with a fixed summation order, so
    /// repeated calls agree bit for bit, and about a tenth of the GEMM pipeline's extra
    /// memory. Slower than `Gemm` and `DirectTf32x3` (H100, 100x1000->1000 f32: 168 us
    /// against 130 and 68 us). Covers spline orders 1..=3 with up to 8 bases per feature (e.g. G = 5,
    /// k = 3); otherwise forcing it is an error.
    Direct,
    /// `cuda/kan_direct.cu`'s tensor-core form, f32 layers only: the direct forward's
    /// block work (features computed in the block, weights folded as they are staged)
    /// with the products on TF32 tensor cores. Each f32 operand is split into two TF32
    /// parts and three products are summed (hi·hi + hi·lo + lo·hi), so the result keeps f32
    /// accuracy whether or not TF32 is allowed. Fixed summation order: repeated calls agree
    /// bit for bit. Same coverage as `Direct`; otherwise, or for a bf16/f16 layer, forcing
    /// it is an error.
    DirectTf32x3,
}

/// A KANLinear layer: its parameters live on one device in one element type.
#[derive(Clone, Debug)]
pub struct KanLinear {
    config: KanLinearConfig,
    grid: KnotGrid,
    base_weight: Tensor,
    spline_weight: Tensor,
    spline_scaler: Option<Tensor>,
    allow_tf32: bool,
    forward_path: KanForwardPath,
}

/// Gradients of `sum(y * dy)` with respect to the input and every parameter.
#[derive(Clone, Debug)]
pub struct KanGrads {
    pub dx: Tensor,
    pub base_weight: Tensor,
    pub spline_weight: Tensor,
    pub spline_scaler: Option<Tensor>,
}

impl KanLinear {
    /// A layer initialised like efficient-kan's `reset_parameters`, from `seed`:
    /// kaiming-uniform base weights (a = sqrt(5) scale_base), spline weights fitted by least
    /// squares to uniform noise of amplitude scale_noise / G at the grid's interior knots,
    /// and kaiming-uniform scalers (a = sqrt(5) scale_spline).
    pub fn new(config: KanLinearConfig, dtype: DType, device: &Device, seed: u64) -> Result<KanLinear> {
        config.validate()?;
        let (inf, outf, g, k) = (config.in_features, config.out_features, config.grid_size, config.spline_order);
        let nb = config.n_bases();
        let grid = KnotGrid::uniform(inf, g, k, config.grid_range, &Device::Cpu)?;
        let knots = grid.knots().to_f64_vec()?;
        let n_knots = grid.n_knots();
        let mut rng = Rng::new(seed);
        let base = fit::kaiming_uniform(&mut rng, outf * inf, 5f64.sqrt() * config.scale_base, inf);
        // noise (G + 1, in, out), as efficient-kan draws it
        let noise: Vec<f64> =
            (0..(g + 1) * inf * outf).map(|_| (rng.unit() - 0.5) * config.scale_noise / g as f64).collect();
        let factor = if config.standalone_scale_spline { 1.0 } else { config.scale_spline };
        let mut spline = vec![0.0; outf * inf * nb];
        for i in 0..inf {
            let t = &knots[i * n_knots..(i + 1) * n_knots];
            let points = &t[k..=k + g];
            let y: Vec<f64> = (0..=g)
                .flat_map(|q| (0..outf).map(move |o| (q, o)))
                .map(|(q, o)| noise[(q * inf + i) * outf + o])
                .collect();
            let coeff = fit::fit_feature(points, &y, outf, t, k);
            for o in 0..outf {
                for j in 0..nb {
                    spline[(o * inf + i) * nb + j] = factor * coeff[j * outf + o];
                }
            }
        }
        let scaler = config
            .standalone_scale_spline
            .then(|| fit::kaiming_uniform(&mut rng, outf * inf, 5f64.sqrt() * config.scale_spline, inf));
        // The spline weights are the noise fit times scale_spline unless a standalone scaler
        // holds scale_spline's kaiming draw instead.
        let spline_arg = if config.standalone_scale_spline { "scale_noise" } else { "scale_spline" };
        for (arg, values) in
            [("scale_base", Some(&base)), (spline_arg, Some(&spline)), ("scale_spline", scaler.as_ref())]
        {
            // NaN (an inf - inf inside the fit) counts as too large.
            let largest = values
                .map_or(0.0, |v| v.iter().fold(0.0f64, |m, x| if x.is_nan() { f64::INFINITY } else { m.max(x.abs()) }));
            if largest > dtype.max_finite() {
                return Err(Error::invalid(
                    arg,
                    format!("a scale whose initial weights fit in {dtype} (|w| <= {:e})", dtype.max_finite()),
                    format!("{} = {:e}, making |w| up to {largest:e}", arg, config.scale_by_name(arg)),
                ));
            }
        }
        let to = |v: &[f64], shape: &[usize]| {
            let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Tensor::from_f32(&f, shape, dtype, device)
        };
        KanLinear::from_parameters(
            config,
            grid.to_device(device)?,
            to(&base, &[outf, inf])?,
            to(&spline, &[outf, inf, nb])?,
            scaler.map(|s| to(&s, &[outf, inf])).transpose()?,
        )
    }

    /// A layer from existing parameters (e.g. loaded from an efficient-kan checkpoint):
    /// shapes, element types and devices are checked against `config` and each other.
    pub fn from_parameters(
        config: KanLinearConfig,
        grid: KnotGrid,
        base_weight: Tensor,
        spline_weight: Tensor,
        spline_scaler: Option<Tensor>,
    ) -> Result<KanLinear> {
        config.validate()?;
        let (inf, outf, nb) = (config.in_features, config.out_features, config.n_bases());
        if grid.in_features() != inf || grid.order() != config.spline_order || grid.n_bases() != nb {
            return Err(Error::invalid(
                "grid",
                format!("{inf} features, order {}, {nb} bases", config.spline_order),
                format!("{} features, order {}, {} bases", grid.in_features(), grid.order(), grid.n_bases()),
            ));
        }
        let dtype = base_weight.dtype();
        let device = base_weight.device();
        base_weight.expect_shape("base_weight", &[outf, inf])?;
        spline_weight.expect_shape("spline_weight", &[outf, inf, nb])?;
        spline_weight.expect_dtype("spline_weight", dtype)?;
        spline_weight.expect_device("spline_weight", &device)?;
        if let Some(s) = &spline_scaler {
            s.expect_shape("spline_scaler", &[outf, inf])?;
            s.expect_dtype("spline_scaler", dtype)?;
            s.expect_device("spline_scaler", &device)?;
        }
        if spline_scaler.is_some() != config.standalone_scale_spline {
            return Err(Error::invalid(
                "spline_scaler",
                format!("present exactly when standalone_scale_spline ({})", config.standalone_scale_spline),
                if spline_scaler.is_some() { "a scaler" } else { "none" },
            ));
        }
        grid.knots().expect_device("grid", &device)?;
        Ok(KanLinear {
            config,
            grid,
            base_weight,
            spline_weight,
            spline_scaler,
            allow_tf32: false,
            forward_path: KanForwardPath::Auto,
        })
    }

    pub fn config(&self) -> &KanLinearConfig {
        &self.config
    }
    pub fn grid(&self) -> &KnotGrid {
        &self.grid
    }
    pub fn base_weight(&self) -> &Tensor {
        &self.base_weight
    }
    pub fn spline_weight(&self) -> &Tensor {
        &self.spline_weight
    }
    pub fn spline_scaler(&self) -> Option<&Tensor> {
        self.spline_scaler.as_ref()
    }
    pub fn dtype(&self) -> DType {
        self.base_weight.dtype()
    }
    pub fn device(&self) -> Device {
        self.base_weight.device()
    }

    /// f32 layers on a GPU: let the GEMMs use TF32 tensor cores (about 3e-4 relative
    /// error instead of ~1e-6). Off by default; no effect on bf16/f16 or the CPU.
    pub fn set_allow_tf32(&mut self, allow: bool) {
        self.allow_tf32 = allow;
    }

    pub fn allow_tf32(&self) -> bool {
        self.allow_tf32
    }

    /// Chooses the GPU forward pipeline (no effect on the CPU).
    pub fn set_forward_path(&mut self, path: KanForwardPath) {
        self.forward_path = path;
    }

    pub fn forward_path(&self) -> KanForwardPath {
        self.forward_path
    }

    /// The pipeline [`KanLinear::forward`] runs for an input of `rows` rows: `Auto`
    /// resolved. Errors for a forced direct path that does not cover the layer come from
    /// `forward`.
    pub fn resolved_forward_path(&self, rows: usize) -> KanForwardPath {
        match self.forward_path {
            KanForwardPath::Auto if direct::tf32x3_preferred(self, rows) => KanForwardPath::DirectTf32x3,
            KanForwardPath::Auto => KanForwardPath::Gemm,
            path => path,
        }
    }

    /// The same layer on `device`.
    pub fn to_device(&self, device: &Device) -> Result<KanLinear> {
        Ok(KanLinear {
            config: self.config.clone(),
            grid: self.grid.to_device(device)?,
            base_weight: self.base_weight.to_device(device)?,
            spline_weight: self.spline_weight.to_device(device)?,
            spline_scaler: self.spline_scaler.as_ref().map(|s| s.to_device(device)).transpose()?,
            allow_tf32: self.allow_tf32,
            forward_path: self.forward_path,
        })
    }

    /// Rows of `x` (product of the leading dimensions), after checking it fits the layer.
    fn check_input(&self, arg: &'static str, x: &Tensor) -> Result<usize> {
        match x.shape().last() {
            Some(&d) if d == self.config.in_features => {}
            _ => {
                return Err(Error::invalid(
                    arg,
                    format!("shape (..., {}) (in_features)", self.config.in_features),
                    format!("shape {:?}", x.shape()),
                ))
            }
        }
        x.expect_dtype(arg, self.dtype())?;
        x.expect_device(arg, &self.device())?;
        Ok(x.elem_count() / self.config.in_features)
    }

    /// `(..., out)` for an input `(..., in)`.
    fn output_shape(&self, x: &Tensor) -> Vec<usize> {
        let mut shape = x.shape().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.config.out_features;
        }
        shape
    }

    /// `y` of shape `(..., out)` for `x` of shape `(..., in)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = self.check_input("x", x)?;
        let out_shape = self.output_shape(x);
        match self.device() {
            Device::Cpu => {
                let y = cpu::forward(&self.params64()?, &x.to_f64_vec()?);
                Tensor::from_f64_rounded(&y, &out_shape, self.dtype())
            }
            Device::Cuda(dev) => match self.resolved_forward_path(rows) {
                KanForwardPath::Direct => direct::forward(self, &dev, x, rows, &out_shape),
                KanForwardPath::DirectTf32x3 => direct::forward_tf32x3(self, &dev, x, rows, &out_shape),
                _ => cuda::forward(self, &dev, x, rows, &out_shape),
            },
        }
    }

    /// Gradients of `sum(forward(x) * dy)`; `dy` has the shape of the output. The forward
    /// is recomputed (nothing is kept between calls).
    pub fn backward(&self, x: &Tensor, dy: &Tensor) -> Result<KanGrads> {
        let rows = self.check_input("x", x)?;
        let out_shape = self.output_shape(x);
        dy.expect_shape("dy", &out_shape)?;
        dy.expect_dtype("dy", self.dtype())?;
        dy.expect_device("dy", &self.device())?;
        match self.device() {
            Device::Cpu => {
                let p = self.params64()?;
                let g = cpu::backward(&p, &x.to_f64_vec()?, &dy.to_f64_vec()?);
                let dt = self.dtype();
                Ok(KanGrads {
                    dx: Tensor::from_f64_rounded(&g.dx, x.shape(), dt)?,
                    base_weight: Tensor::from_f64_rounded(&g.base_weight, self.base_weight.shape(), dt)?,
                    spline_weight: Tensor::from_f64_rounded(&g.spline_weight, self.spline_weight.shape(), dt)?,
                    spline_scaler: g
                        .spline_scaler
                        .map(|s| Tensor::from_f64_rounded(&s, &[p.out_features, p.in_features], dt))
                        .transpose()?,
                })
            }
            Device::Cuda(dev) => cuda::backward(self, &dev, x, dy, rows),
        }
    }

    /// efficient-kan's `regularization_loss(regularize_activation, regularize_entropy)`.
    pub fn regularization_loss(&self, activation: f64, entropy: f64) -> Result<f64> {
        for (arg, v) in [("activation", activation), ("entropy", entropy)] {
            if !v.is_finite() {
                return Err(Error::invalid(arg, "a finite weight", v.to_string()));
            }
        }
        let w = self.spline_weight.to_f64_vec()?;
        Ok(fit::regularization_loss(&w, self.config.n_bases(), activation, entropy))
    }

    /// efficient-kan's `update_grid(x, margin)`: new knots from the samples `x` (`(..., in)`)
    /// mixed with a uniform grid by `grid_eps`, then spline coefficients refit by least
    /// squares so the spline branch's output on `x` is preserved (see the module notes).
    /// Runs on the host in f64; the parameters are moved back to the layer's device.
    pub fn update_grid(&mut self, x: &Tensor, margin: f64) -> Result<()> {
        let rows = self.check_input("x", x)?;
        if rows == 0 {
            return Err(Error::invalid("x", "at least one sample", "0 rows"));
        }
        if !margin.is_finite() {
            return Err(Error::invalid("margin", "a finite number", margin.to_string()));
        }
        let xs = x.to_f64_vec()?;
        if let Some((index, &v)) = xs.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFinite { arg: "x", index, value: v });
        }
        let inf = self.config.in_features;
        for i in 0..inf {
            let (lo, hi) =
                (0..rows).map(|b| xs[b * inf + i]).fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v)));
            // The new grid spans [lo - margin, hi + margin] in f32: a zero width collapses
            // every knot onto one value (the spline branch would become zero, not preserved);
            // an infinite one makes the knots non-finite.
            let (new_lo, new_hi) = ((lo - margin) as f32, (hi + margin) as f32);
            if !(new_lo.is_finite() && new_hi.is_finite()) {
                return Err(Error::invalid(
                    "margin",
                    "a margin keeping the new grid finite in f32",
                    format!("{margin:e} around samples in [{lo:e}, {hi:e}] of feature {i}"),
                ));
            }
            if new_hi <= new_lo {
                return Err(Error::invalid(
                    "margin",
                    format!(
                        "a margin leaving the new grid a positive width (feature {i}: samples in [{lo:e}, {hi:e}])"
                    ),
                    margin.to_string(),
                ));
            }
        }
        let p = self.params64()?;
        let (inf, outf, nb, k) = (p.in_features, p.out_features, p.n_bases(), p.order);
        let cfg = self.config.clone();
        let results: Vec<(Vec<f32>, Vec<f64>)> = parallel_map(inf, |i| {
            let mut col: Vec<f64> = (0..rows).map(|b| xs[b * inf + i]).collect();
            let samples = col.clone();
            col.sort_by(f64::total_cmp);
            let knots32: Vec<f32> =
                fit::updated_knots(&col, cfg.grid_size, k, cfg.grid_eps, margin).iter().map(|&v| v as f32).collect();
            let new_t: Vec<f64> = knots32.iter().map(|&v| v as f64).collect();
            let old_t = &p.knots[i * p.n_knots..(i + 1) * p.n_knots];
            // Targets: the old spline branch of feature i on every sample, for every output.
            let mut y = vec![0.0; rows * outf];
            for (b, &xv) in samples.iter().enumerate() {
                let Some((first, row)) = crate::ops::bspline::cpu::nonzero_bases(xv, old_t, k) else { continue };
                for o in 0..outf {
                    let oi = o * inf + i;
                    let s = p.spline_scaler.as_ref().map_or(1.0, |s| s[oi]);
                    let w = &p.spline_weight[oi * nb + first..(oi + 1) * nb];
                    y[b * outf + o] = s * row.iter().zip(w).map(|(a, c)| a * c).sum::<f64>();
                }
            }
            (knots32, fit::fit_feature(&samples, &y, outf, &new_t, k))
        });
        let mut knots = Vec::with_capacity(inf * p.n_knots);
        let mut spline = vec![0.0f32; outf * inf * nb];
        for (i, (kn, coeff)) in results.iter().enumerate() {
            knots.extend_from_slice(kn);
            for o in 0..outf {
                let oi = o * inf + i;
                let s = p.spline_scaler.as_ref().map_or(1.0, |s| s[oi]);
                for j in 0..nb {
                    let c = coeff[j * outf + o];
                    spline[oi * nb + j] = if s != 0.0 { (c / s) as f32 } else { 0.0 };
                }
            }
        }
        let device = self.device();
        let grid = KnotGrid::from_knots(&Tensor::from_vec(knots, &[inf, p.n_knots], &Device::Cpu)?, k)?;
        self.grid = grid.to_device(&device)?;
        self.spline_weight = Tensor::from_f32(&spline, &[outf, inf, nb], self.dtype(), &device)?;
        Ok(())
    }

    /// Host f64 copies of the parameters (used by the CPU backend and the fitting code).
    pub fn params64(&self) -> Result<cpu::Params64> {
        Ok(cpu::Params64 {
            in_features: self.config.in_features,
            out_features: self.config.out_features,
            n_knots: self.grid.n_knots(),
            order: self.grid.order(),
            knots: self.grid.knots().to_f64_vec()?,
            base_weight: self.base_weight.to_f64_vec()?,
            spline_weight: self.spline_weight.to_f64_vec()?,
            spline_scaler: self.spline_scaler.as_ref().map(|s| s.to_f64_vec()).transpose()?,
        })
    }
}

/// `f(0..n)` on the available cores, results in order.
fn parallel_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n).max(1);
    let chunk = n.div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| s.spawn(move || (t * chunk..((t + 1) * chunk).min(n)).map(f).collect::<Vec<T>>()))
            .collect();
        // A worker panics only on a bug; re-raise it rather than return partial results.
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}
