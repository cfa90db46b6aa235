//! Correctness checking shared by the CLI's `check` and the test suites: a small seeded
//! PRNG, random input generators, the relative-error measure and the documented
//! tolerances.
//!
//! Error measure: `‖out − ref‖₂ / ‖ref‖₂` over all elements, where `ref` is the f64 CPU
//! reference evaluated on the same (already rounded) inputs. A NaN in `out` where `ref`
//! has none (or the reverse) is an infinite error, so unwritten NaN-poisoned outputs
//! always fail.
//!
//! Tolerances ([`tolerance`]): the kernels compute in f32 and round once to the storage
//! type, so the error is the f32 arithmetic error plus one rounding of the output:
//!
//! | op | f32 | bf16 | f16 |
//! |---|---|---|---|
//! | B-spline basis | 1e-6 | 4e-3 | 1e-3 |
//! | B-spline basis derivative | 1e-5 | 4e-3 | 1e-3 |
//!
//! bf16 keeps 8 significant bits (rounding error ≤ 2⁻⁹ ≈ 2.0e-3 relative), f16 11 bits
//! (≤ 2⁻¹¹ ≈ 4.9e-4); the tolerances are twice those. The derivative subtracts two
//! terms of size ~k/h, so its f32 error is larger than the basis'.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::bspline::{self, BasisKind, KnotGrid};
use crate::tensor::Tensor;

/// SplitMix64: small, seedable, good enough for test inputs.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seeded from the clock: fresh inputs on every run (the seed is printed by callers).
    pub fn from_time() -> Rng {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Rng(nanos ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

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

/// `‖out − ref‖₂ / ‖ref‖₂`; infinite when NaNs do not line up; the absolute norm of
/// `out` when `ref` is all zeros.
pub fn relative_error(out: &[f64], reference: &[f64]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        if o.is_nan() != r.is_nan() || o.is_infinite() != r.is_infinite() {
            return f64::INFINITY;
        }
        if r.is_nan() || (r.is_infinite() && o == r) {
            continue;
        }
        diff += (o - r) * (o - r);
        norm += r * r;
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// The documented tolerance of `relative_error` for one op and element type.
pub fn tolerance(kind: BasisKind, dtype: DType) -> f64 {
    match (kind, dtype) {
        (BasisKind::Value, DType::F32) => 1e-6,
        (BasisKind::Derivative, DType::F32) => 1e-5,
        (_, DType::BF16) => 4e-3,
        (_, DType::F16) => 1e-3,
    }
}

/// `‖out − ref‖₂ / ‖magnitude‖₂`, where `magnitude` is the reference computed over absolute
/// values of every term (the scale of a sum's rounding error): the error measure for GEMM
/// outputs, which plain relative error overstates when the terms cancel (a single output
/// summing hundreds of terms of size one to nearly zero). NaNs must line up as in
/// [`relative_error`].
pub fn scaled_error(out: &[f64], reference: &[f64], magnitude: &[f64]) -> f64 {
    if out.len() != reference.len() || out.len() != magnitude.len() {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for ((&o, &r), &m) in out.iter().zip(reference).zip(magnitude) {
        if o.is_nan() != r.is_nan() || o.is_infinite() != r.is_infinite() {
            return f64::INFINITY;
        }
        if r.is_nan() || r.is_infinite() {
            continue;
        }
        diff += (o - r) * (o - r);
        norm += m * m;
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// Tolerance of KANLinear's forward and gradients, measured by [`scaled_error`] against
/// the f64 reference. f32 runs SGEMM-accurate (1e-5); TF32 rounds GEMM operands to 10
/// mantissa bits (2^-11 = 4.9e-4 each: 3e-3); bf16 and f16 round SiLU(x), the bases, the
/// GEMM outputs and intermediate gradients to the storage type (2^-9, 2^-11 each: 1e-2, 3e-3).
pub fn kan_tolerance(dtype: DType, tf32: bool) -> f64 {
    match (dtype, tf32) {
        (DType::F32, false) => 1e-5,
        (DType::F32, true) => 3e-3,
        (DType::BF16, _) => 1e-2,
        (DType::F16, _) => 3e-3,
    }
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
        Ok(relative_error(&out.to_f64_vec()?, &reference))
    }
}

/// One random KANLinear case: forward and all gradients on `device` against the f64
/// reference, parameters and inputs rounded to `dtype` first so both see the same values.
#[derive(Clone, Debug)]
pub struct KanCase {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub grid_size: usize,
    pub order: usize,
    pub scaler: bool,
    pub dtype: DType,
    pub tf32: bool,
    /// The GPU forward pipeline (the backward is the same for all).
    pub path: crate::ops::kan::KanForwardPath,
}

/// Relative errors of one [`KanCase`].
#[derive(Clone, Copy, Debug)]
pub struct KanErrors {
    pub y: f64,
    pub dx: f64,
    pub base_weight: f64,
    pub spline_weight: f64,
    pub spline_scaler: f64,
}

impl KanErrors {
    pub fn max(&self) -> f64 {
        [self.y, self.dx, self.base_weight, self.spline_weight, self.spline_scaler].into_iter().fold(0.0, f64::max)
    }

    pub fn named(&self) -> [(&'static str, f64); 5] {
        [
            ("y", self.y),
            ("dx", self.dx),
            ("dW_base", self.base_weight),
            ("dW_spline", self.spline_weight),
            ("dscaler", self.spline_scaler),
        ]
    }
}

impl KanCase {
    pub fn run(&self, seed: u64, device: &Device) -> Result<KanErrors> {
        use crate::ops::kan::{cpu, KanLinear, KanLinearConfig};
        let mut c = KanLinearConfig::new(self.in_features, self.out_features);
        c.grid_size = self.grid_size;
        c.spline_order = self.order;
        c.standalone_scale_spline = self.scaler;
        c.scale_noise = 1.0; // spline weights of order one, so the spline branch matters
        let layer_host = KanLinear::new(c, self.dtype, &Device::Cpu, seed)?;
        let mut layer = layer_host.to_device(device)?;
        layer.set_allow_tf32(self.tf32);
        layer.set_forward_path(self.path);
        let mut rng = Rng::new(seed ^ 0xABCD);
        // Mostly inside the grid, some far outside it.
        let x: Vec<f32> = (0..self.batch * self.in_features)
            .map(|_| if rng.below(10) == 0 { rng.uniform(-6.0, 6.0) } else { rng.uniform(-1.2, 1.2) } as f32)
            .collect();
        let dy: Vec<f32> = (0..self.batch * self.out_features).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let xt = Tensor::from_f32(&x, &[self.batch, self.in_features], self.dtype, device)?;
        let dyt = Tensor::from_f32(&dy, &[self.batch, self.out_features], self.dtype, device)?;
        let p = layer_host.params64()?;
        let (x64, dy64) = (xt.to_f64_vec()?, dyt.to_f64_vec()?);
        let y_ref = cpu::forward(&p, &x64);
        let y_mag = cpu::forward_magnitude(&p, &x64);
        let g_ref = cpu::backward(&p, &x64, &dy64);
        let g_mag = cpu::backward_magnitude(&p, &x64, &dy64);
        let y = layer.forward(&xt)?.to_f64_vec()?;
        let g = layer.backward(&xt, &dyt)?;
        let spline_scaler = match (&g.spline_scaler, &g_ref.spline_scaler, &g_mag.spline_scaler) {
            (Some(a), Some(b), Some(m)) => scaled_error(&a.to_f64_vec()?, b, m),
            (None, None, None) => 0.0,
            _ => f64::INFINITY,
        };
        Ok(KanErrors {
            y: scaled_error(&y, &y_ref, &y_mag),
            dx: scaled_error(&g.dx.to_f64_vec()?, &g_ref.dx, &g_mag.dx),
            base_weight: scaled_error(&g.base_weight.to_f64_vec()?, &g_ref.base_weight, &g_mag.base_weight),
            spline_weight: scaled_error(&g.spline_weight.to_f64_vec()?, &g_ref.spline_weight, &g_mag.spline_weight),
            spline_scaler,
        })
    }
}

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

/// Tolerance of the selective scan's outputs and gradients ([`relative_error`] against the
/// f64 reference on the same rounded inputs). The kernels compute in f32 (exp through
/// ex2.approx, relative error ~2^-22) and round each output once: f32 keeps the error of
/// sums over up to a few thousand steps and channels (1e-4 leaves ~10x headroom over what
/// is measured); bf16 / f16 add one rounding of each output (2^-9 / 2^-11, doubled).
pub fn scan_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::BF16 => 4e-3,
        DType::F16 => 1e-3,
    }
}

/// [`relative_error`] of a device or host tensor against its reference.
fn tensor_error(t: &Tensor, reference: &[f64]) -> Result<f64> {
    Ok(relative_error(&t.to_f64_vec()?, reference))
}

/// [`tensor_error`] of an optional gradient: 0 when both are absent, infinite when only one is.
fn optional_error(t: &Option<Tensor>, reference: &Option<Vec<f64>>) -> Result<f64> {
    match (t, reference) {
        (Some(t), Some(r)) => tensor_error(t, r),
        (None, None) => Ok(0.0),
        _ => Ok(f64::INFINITY),
    }
}

/// One random selective-scan problem: which optional inputs it has and how large.
#[derive(Clone, Debug)]
pub struct ScanCase {
    pub batch: usize,
    pub dim: usize,
    pub dstate: usize,
    pub len: usize,
    /// Groups of the time-varying B / C (must divide `dim`).
    pub groups: usize,
    pub b_variable: bool,
    pub c_variable: bool,
    pub with_d: bool,
    pub with_z: bool,
    pub with_bias: bool,
    pub softplus: bool,
    pub with_h0: bool,
    pub with_resets: bool,
    pub with_dlast: bool,
    /// Hand the forward's checkpoints to the backward (else it recomputes them).
    pub checkpoints: bool,
    /// A is drawn from -(0.5 .. a_max): large values make |dt A| large (the stability case).
    pub a_max: f64,
    pub dtype: DType,
}

/// The tensors of a [`ScanCase`], owned.
#[derive(Clone, Debug)]
pub struct ScanTensors {
    pub u: Tensor,
    pub delta: Tensor,
    pub a: Tensor,
    pub b: Tensor,
    pub c: Tensor,
    pub d: Option<Tensor>,
    pub z: Option<Tensor>,
    pub delta_bias: Option<Tensor>,
    pub h0: Option<Tensor>,
    pub resets: Option<crate::ops::selective_scan::SequenceResets>,
    pub softplus: bool,
}

impl ScanTensors {
    pub fn inputs(&self) -> crate::ops::selective_scan::ScanInputs<'_> {
        crate::ops::selective_scan::ScanInputs {
            d: self.d.as_ref(),
            z: self.z.as_ref(),
            delta_bias: self.delta_bias.as_ref(),
            delta_softplus: self.softplus,
            h0: self.h0.as_ref(),
            resets: self.resets.as_ref(),
            ..crate::ops::selective_scan::ScanInputs::new(&self.u, &self.delta, &self.a, &self.b, &self.c)
        }
    }

    pub fn to_device(&self, device: &Device) -> Result<ScanTensors> {
        let mv = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device)).transpose();
        Ok(ScanTensors {
            u: self.u.to_device(device)?,
            delta: self.delta.to_device(device)?,
            a: self.a.to_device(device)?,
            b: self.b.to_device(device)?,
            c: self.c.to_device(device)?,
            d: mv(&self.d)?,
            z: mv(&self.z)?,
            delta_bias: mv(&self.delta_bias)?,
            h0: mv(&self.h0)?,
            resets: self.resets.as_ref().map(|r| r.to_device(device)).transpose()?,
            softplus: self.softplus,
        })
    }
}

impl ScanCase {
    /// A case with its options from the bits of `flags`: 0 constant B, 1 constant C, 2 D,
    /// 3 z, 4 delta_bias, 5 softplus, 6 h0, 7 resets, 8 a last-state gradient, 9 the
    /// forward's checkpoints handed to the backward; A in -(0.5..16).
    pub fn from_option_bits(
        batch: usize,
        dim: usize,
        dstate: usize,
        len: usize,
        groups: usize,
        flags: u32,
        dtype: DType,
    ) -> ScanCase {
        let bit = |i: u32| flags & (1 << i) != 0;
        ScanCase {
            batch,
            dim,
            dstate,
            len,
            groups,
            b_variable: !bit(0),
            c_variable: !bit(1),
            with_d: bit(2),
            with_z: bit(3),
            with_bias: bit(4),
            softplus: bit(5),
            with_h0: bit(6),
            with_resets: bit(7),
            with_dlast: bit(8),
            checkpoints: bit(9),
            a_max: 16.0,
            dtype,
        }
    }

    /// mamba-like inputs on the host: dt = softplus(delta + bias) in about 0.005..1, A in
    /// -(0.5..a_max), B, C, u, z, D, h0 of order one, resets at ~3% of the steps.
    pub fn tensors(&self, rng: &mut Rng) -> Result<ScanTensors> {
        let (bt, dm, n, l, g) = (self.batch, self.dim, self.dstate, self.len, self.groups);
        let dev = Device::Cpu;
        let dt = self.dtype;
        let mut gen =
            |count: usize, lo: f64, hi: f64| -> Vec<f32> { (0..count).map(|_| rng.uniform(lo, hi) as f32).collect() };
        let seq = [bt, dm, l];
        let u = Tensor::from_f32(&gen(bt * dm * l, -1.0, 1.0), &seq, dt, &dev)?;
        let delta = if self.softplus {
            Tensor::from_f32(&gen(bt * dm * l, -2.0, 1.0), &seq, dt, &dev)?
        } else {
            Tensor::from_f32(&gen(bt * dm * l, 0.005, 0.5), &seq, dt, &dev)?
        };
        let a = Tensor::from_f32(&gen(dm * n, -self.a_max, -0.5), &[dm, n], DType::F32, &dev)?;
        let bc = |variable: bool, gen: &mut dyn FnMut(usize, f64, f64) -> Vec<f32>| -> Result<Tensor> {
            if variable {
                Tensor::from_f32(&gen(bt * g * n * l, -1.0, 1.0), &[bt, g, n, l], dt, &dev)
            } else {
                Tensor::from_f32(&gen(dm * n, -1.0, 1.0), &[dm, n], DType::F32, &dev)
            }
        };
        let b = bc(self.b_variable, &mut gen)?;
        let c = bc(self.c_variable, &mut gen)?;
        let d = self.with_d.then(|| Tensor::from_f32(&gen(dm, -1.0, 1.0), &[dm], DType::F32, &dev)).transpose()?;
        let z = self.with_z.then(|| Tensor::from_f32(&gen(bt * dm * l, -3.0, 3.0), &seq, dt, &dev)).transpose()?;
        let (blo, bhi) = if self.softplus { (-3.0, -0.5) } else { (-0.004, 0.05) };
        let delta_bias =
            self.with_bias.then(|| Tensor::from_f32(&gen(dm, blo, bhi), &[dm], DType::F32, &dev)).transpose()?;
        let h0 = self
            .with_h0
            .then(|| Tensor::from_f32(&gen(bt * dm * n, -1.0, 1.0), &[bt, dm, n], DType::F32, &dev))
            .transpose()?;
        let resets = if self.with_resets {
            let flags: Vec<bool> = (0..bt * l).map(|_| rng.below(32) == 0).collect();
            Some(crate::ops::selective_scan::SequenceResets::from_flags(bt, l, &flags)?)
        } else {
            None
        };
        Ok(ScanTensors { u, delta, a, b, c, d, z, delta_bias, h0, resets, softplus: self.softplus })
    }

    /// Forward, last state and every gradient on `device` against the f64 reference:
    /// `(name, relative error)` per output.
    pub fn run(&self, seed: u64, device: &Device) -> Result<Vec<(&'static str, f64)>> {
        use crate::ops::selective_scan::{cpu, selective_scan_backward, selective_scan_for_backward};
        let mut rng = Rng::new(seed);
        let host = self.tensors(&mut rng)?;
        let seq = [self.batch, self.dim, self.len];
        let dout = Tensor::from_f32(
            &(0..seq.iter().product()).map(|_| rng.uniform(-1.0, 1.0) as f32).collect::<Vec<_>>(),
            &seq,
            self.dtype,
            &Device::Cpu,
        )?;
        let n_state = self.batch * self.dim * self.dstate;
        let dlast = self
            .with_dlast
            .then(|| {
                let v: Vec<f32> = (0..n_state).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
                Tensor::from_f32(&v, &[self.batch, self.dim, self.dstate], DType::F32, &Device::Cpu)
            })
            .transpose()?;
        let p = host.inputs().to_f64()?;
        let f_ref = cpu::forward(&p);
        let g_ref =
            cpu::backward(&p, &dout.to_f64_vec()?, dlast.as_ref().map(|t| t.to_f64_vec()).transpose()?.as_deref());

        let dev_t = host.to_device(device)?;
        let inputs = dev_t.inputs();
        let (dout_d, dlast_d) = (dout.to_device(device)?, dlast.as_ref().map(|t| t.to_device(device)).transpose()?);
        let (out, ckpt) = selective_scan_for_backward(&inputs)?;
        let g = selective_scan_backward(&inputs, &dout_d, dlast_d.as_ref(), self.checkpoints.then_some(&ckpt))?;
        let (err, opt) = (tensor_error, optional_error);
        Ok(vec![
            ("out", err(&out.out, &f_ref.out)?),
            ("last_state", err(&out.last_state, &f_ref.last_state)?),
            ("du", err(&g.du, &g_ref.du)?),
            ("ddelta", err(&g.ddelta, &g_ref.ddelta)?),
            ("dA", err(&g.da, &g_ref.da)?),
            ("dB", err(&g.db, &g_ref.db)?),
            ("dC", err(&g.dc, &g_ref.dc)?),
            ("dD", opt(&g.dd, &g_ref.dd)?),
            ("dz", opt(&g.dz, &g_ref.dz)?),
            ("ddelta_bias", opt(&g.ddelta_bias, &g_ref.ddelta_bias)?),
            ("dh0", opt(&g.dh0, &g_ref.dh0)?),
        ])
    }
}

/// Decoding a [`ScanCase`] token by token with `selective_state_update` from its `h0`
/// against one `selective_scan` over the sequence, both on `device`: relative errors of the
/// outputs (all tokens) and of the final state. Resets do not apply to decoding (the case's
/// are ignored).
pub fn decode_against_scan(case: &ScanCase, seed: u64, device: &Device) -> Result<(f64, f64)> {
    use crate::ops::selective_scan::{selective_scan, selective_state_update, StepInputs};
    let case = ScanCase { with_resets: false, with_h0: true, ..case.clone() };
    let host = case.tensors(&mut Rng::new(seed))?;
    let dev_t = host.to_device(device)?;
    let scan = selective_scan(&dev_t.inputs())?;
    let (bt, dm, n, l, g) = (case.batch, case.dim, case.dstate, case.len, case.groups);
    let dt = case.dtype;
    let seq = |t: &Tensor| t.to_f32_vec();
    let (u, delta) = (seq(&host.u)?, seq(&host.delta)?);
    let z = host.z.as_ref().map(seq).transpose()?;
    let col = |v: &[f32], t: usize| -> Vec<f32> { (0..bt * dm).map(|r| v[r * l + t]).collect() };
    let bc_at = |p: &Tensor, variable: bool, t: usize| -> Result<Tensor> {
        let v = p.to_f32_vec()?;
        if variable {
            let s: Vec<f32> = (0..bt * g * n).map(|r| v[r * l + t]).collect();
            Tensor::from_f32(&s, &[bt, g, n], dt, device)
        } else {
            Ok(p.to_device(device)?)
        }
    };
    let mut state = host
        .h0
        .as_ref()
        .map_or_else(|| Tensor::full(0.0, &[bt, dm, n], DType::F32, device), |h| h.to_device(device))?;
    let mut outs = vec![0.0f64; bt * dm * l];
    for t in 0..l {
        let x = Tensor::from_f32(&col(&u, t), &[bt, dm], dt, device)?;
        let dtt = Tensor::from_f32(&col(&delta, t), &[bt, dm], dt, device)?;
        let zt = z.as_ref().map(|z| Tensor::from_f32(&col(z, t), &[bt, dm], dt, device)).transpose()?;
        let (bt_t, ct_t) = (bc_at(&host.b, case.b_variable, t)?, bc_at(&host.c, case.c_variable, t)?);
        let inputs = StepInputs {
            d: dev_t.d.as_ref(),
            z: zt.as_ref(),
            dt_bias: dev_t.delta_bias.as_ref(),
            dt_softplus: case.softplus,
            ..StepInputs::new(&x, &dtt, &dev_t.a, &bt_t, &ct_t)
        };
        let y = selective_state_update(&mut state, &inputs)?.to_f64_vec()?;
        for (r, v) in y.into_iter().enumerate() {
            outs[r * l + t] = v;
        }
    }
    Ok((
        relative_error(&outs, &scan.out.to_f64_vec()?),
        relative_error(&state.to_f64_vec()?, &scan.last_state.to_f64_vec()?),
    ))
}

/// Tolerance of the causal conv1d's outputs and gradients ([`relative_error`] against the
/// f64 reference on the same rounded inputs). The kernels sum at most `width` products per
/// output in f32 (SiLU through `__expf`) and the weight gradient over batch x len in a
/// fixed tree; bf16 / f16 add one rounding of each output (2^-9 / 2^-11, doubled).
pub fn conv_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::BF16 => 4e-3,
        DType::F16 => 1e-3,
    }
}

/// One random causal-conv1d problem.
#[derive(Clone, Debug)]
pub struct ConvCase {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    pub width: usize,
    pub with_bias: bool,
    pub silu: bool,
    pub with_init: bool,
    pub with_resets: bool,
    pub with_dfinal: bool,
    /// Inputs are drawn from ±`scale` (large values drive SiLU into saturation).
    pub scale: f64,
    pub dtype: DType,
}

/// The tensors of a [`ConvCase`] on the host, owned.
#[derive(Clone, Debug)]
pub struct ConvTensors {
    pub x: Tensor,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub initial_state: Option<Tensor>,
    pub resets: Option<crate::ops::causal_conv1d::SequenceResets>,
    pub silu: bool,
}

impl ConvTensors {
    pub fn inputs(&self) -> crate::ops::causal_conv1d::ConvInputs<'_> {
        crate::ops::causal_conv1d::ConvInputs {
            bias: self.bias.as_ref(),
            initial_state: self.initial_state.as_ref(),
            resets: self.resets.as_ref(),
            silu: self.silu,
            ..crate::ops::causal_conv1d::ConvInputs::new(&self.x, &self.weight)
        }
    }

    pub fn to_device(&self, device: &Device) -> Result<ConvTensors> {
        let mv = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device)).transpose();
        Ok(ConvTensors {
            x: self.x.to_device(device)?,
            weight: self.weight.to_device(device)?,
            bias: mv(&self.bias)?,
            initial_state: mv(&self.initial_state)?,
            resets: self.resets.as_ref().map(|r| r.to_device(device)).transpose()?,
            silu: self.silu,
        })
    }
}

impl ConvCase {
    /// A case with its options from the bits of `flags`: 0 bias, 1 SiLU, 2 initial state,
    /// 3 resets, 4 a final-state gradient; inputs of order one.
    pub fn from_option_bits(batch: usize, dim: usize, len: usize, width: usize, flags: u32, dtype: DType) -> ConvCase {
        let bit = |i: u32| flags & (1 << i) != 0;
        ConvCase {
            batch,
            dim,
            len,
            width,
            with_bias: bit(0),
            silu: bit(1),
            with_init: bit(2),
            with_resets: bit(3),
            with_dfinal: bit(4),
            scale: 1.0,
            dtype,
        }
    }

    fn state_shape(&self) -> [usize; 3] {
        [self.batch, self.dim, self.width - 1]
    }

    /// Inputs on the host: x and the initial state in ±scale, weights in ±1/√width, bias
    /// in ±0.5, resets at ~6% of the steps.
    pub fn tensors(&self, rng: &mut Rng) -> Result<ConvTensors> {
        let dev = Device::Cpu;
        let mut gen = |n: usize, r: f64| -> Vec<f32> { (0..n).map(|_| rng.uniform(-r, r) as f32).collect() };
        let x = Tensor::from_f32(
            &gen(self.batch * self.dim * self.len, self.scale),
            &[self.batch, self.dim, self.len],
            self.dtype,
            &dev,
        )?;
        let wr = 1.0 / (self.width as f64).sqrt();
        let weight = Tensor::from_f32(&gen(self.dim * self.width, wr), &[self.dim, self.width], DType::F32, &dev)?;
        let bias =
            self.with_bias.then(|| Tensor::from_f32(&gen(self.dim, 0.5), &[self.dim], DType::F32, &dev)).transpose()?;
        let n_state = self.batch * self.dim * (self.width - 1);
        let initial_state = self
            .with_init
            .then(|| Tensor::from_f32(&gen(n_state, self.scale), &self.state_shape(), self.dtype, &dev))
            .transpose()?;
        let resets = if self.with_resets {
            let flags: Vec<bool> = (0..self.batch * self.len).map(|_| rng.below(16) == 0).collect();
            Some(crate::ops::causal_conv1d::SequenceResets::from_flags(self.batch, self.len, &flags)?)
        } else {
            None
        };
        Ok(ConvTensors { x, weight, bias, initial_state, resets, silu: self.silu })
    }

    /// Forward, final state and every gradient on `device` against the f64 reference:
    /// `(name, relative error)` per output.
    pub fn run(&self, seed: u64, device: &Device) -> Result<Vec<(&'static str, f64)>> {
        use crate::ops::causal_conv1d::{causal_conv1d, causal_conv1d_backward, cpu};
        let mut rng = Rng::new(seed);
        let host = self.tensors(&mut rng)?;
        let n = self.batch * self.dim * self.len;
        let dout = Tensor::from_f32(
            &(0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect::<Vec<_>>(),
            host.x.shape(),
            self.dtype,
            &Device::Cpu,
        )?;
        let dfinal = self
            .with_dfinal
            .then(|| {
                let v: Vec<f32> =
                    (0..self.batch * self.dim * (self.width - 1)).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
                Tensor::from_f32(&v, &self.state_shape(), self.dtype, &Device::Cpu)
            })
            .transpose()?;
        let p = host.inputs().to_f64()?;
        let f_ref = cpu::forward(&p);
        let g_ref =
            cpu::backward(&p, &dout.to_f64_vec()?, dfinal.as_ref().map(|t| t.to_f64_vec()).transpose()?.as_deref());

        let dev_t = host.to_device(device)?;
        let inputs = dev_t.inputs();
        let (dout_d, dfinal_d) = (dout.to_device(device)?, dfinal.as_ref().map(|t| t.to_device(device)).transpose()?);
        let out = causal_conv1d(&inputs)?;
        let g = causal_conv1d_backward(&inputs, &dout_d, dfinal_d.as_ref())?;
        let (err, opt) = (tensor_error, optional_error);
        Ok(vec![
            ("out", err(&out.out, &f_ref.out)?),
            ("final_state", err(&out.final_state, &f_ref.final_state)?),
            ("dx", err(&g.dx, &g_ref.dx)?),
            ("dweight", err(&g.dweight, &g_ref.dweight)?),
            ("dbias", opt(&g.dbias, &g_ref.dbias)?),
            ("dinitial_state", opt(&g.dinitial_state, &g_ref.dinitial_state)?),
        ])
    }
}

/// Decoding a [`ConvCase`] with `causal_conv1d_update`, `tokens_per_step` tokens at a time,
/// from its initial state padded on the left to `state_len` (>= width - 1), against one
/// `causal_conv1d` over the sequence, both on `device`: relative errors of the outputs (all
/// tokens) and of the final state (the state's last width - 1 values). Resets do not apply
/// to decoding (the case's are ignored).
pub fn decode_against_conv(
    case: &ConvCase,
    seed: u64,
    device: &Device,
    tokens_per_step: usize,
    state_len: usize,
) -> Result<(f64, f64)> {
    use crate::ops::causal_conv1d::{causal_conv1d, causal_conv1d_update};
    let case = ConvCase { with_resets: false, ..case.clone() };
    let host = case.tensors(&mut Rng::new(seed))?;
    let dev_t = host.to_device(device)?;
    let conv = causal_conv1d(&dev_t.inputs())?;
    let (rows, l, sl) = (case.batch * case.dim, case.len, case.width - 1);
    if state_len < sl || tokens_per_step == 0 {
        return Err(Error::invalid("state_len", format!(">= {sl}, and tokens_per_step >= 1"), state_len.to_string()));
    }
    let x = host.x.to_f32_vec()?;
    let init = host.initial_state.as_ref().map(Tensor::to_f32_vec).transpose()?;
    let mut state0 = vec![0.0f32; rows * state_len];
    if let Some(h) = &init {
        for r in 0..rows {
            state0[r * state_len + state_len - sl..][..sl].copy_from_slice(&h[r * sl..][..sl]);
        }
    }
    let mut state = Tensor::from_f32(&state0, &[case.batch, case.dim, state_len], case.dtype, device)?;
    let mut outs = vec![0.0f64; rows * l];
    let mut t0 = 0;
    while t0 < l {
        let tk = tokens_per_step.min(l - t0);
        let chunk: Vec<f32> = (0..rows * tk).map(|i| x[(i / tk) * l + t0 + i % tk]).collect();
        let shape: Vec<usize> =
            if tokens_per_step == 1 { vec![case.batch, case.dim] } else { vec![case.batch, case.dim, tk] };
        let xt = Tensor::from_f32(&chunk, &shape, case.dtype, device)?;
        let y = causal_conv1d_update(&mut state, &xt, &dev_t.weight, dev_t.bias.as_ref(), case.silu)?.to_f64_vec()?;
        for (i, v) in y.into_iter().enumerate() {
            outs[(i / tk) * l + t0 + i % tk] = v;
        }
        t0 += tk;
    }
    let st = state.to_f64_vec()?;
    let last: Vec<f64> = (0..rows).flat_map(|r| st[r * state_len + state_len - sl..][..sl].to_vec()).collect();
    Ok((relative_error(&outs, &conv.out.to_f64_vec()?), relative_error(&last, &conv.final_state.to_f64_vec()?)))
}

/// Tolerance of the mLSTM's h ([`scaled_error`] against the f64 recurrence on the same
/// rounded inputs, scaled by [`crate::ops::mlstm::cpu::h_magnitude`]) and final states
/// ([`relative_error`]). f32: FMA sums over a chunk and the head
/// dimension, gates through `__expf`. bf16 / f16: the tensor-core products take P (the gated
/// scores) and the carried C rounded to the element type, two roundings beyond the output's
/// (2^-9 / 2^-11 each), so five times the rounding step.
pub fn mlstm_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::BF16 => 1e-2,
        DType::F16 => 2.5e-3,
    }
}

/// Tolerance of the mLSTM gradients ([`relative_error`] of each against the f64 reference
/// backward on the same rounded inputs). f32: as the forward, over three recomputing passes
/// and the gate sums. bf16 / f16: each pass rounds dh / d, its gated scores and carried
/// state to the element type for the tensor cores, and the gate gradients read the rounded
/// dk, so about three times the forward's.
pub fn mlstm_grad_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::BF16 => 3e-2,
        DType::F16 => 8e-3,
    }
}

/// One random mLSTM problem.
#[derive(Clone, Debug)]
pub struct MlstmCase {
    pub batch: usize,
    pub heads: usize,
    pub len: usize,
    pub dqk: usize,
    pub dhv: usize,
    pub with_init: bool,
    pub with_dfinal: bool,
    /// Input gate preactivations are drawn from this range, forget gates from `f_range`.
    pub i_range: (f64, f64),
    pub f_range: (f64, f64),
    /// q, k, v are drawn from ±`scale`.
    pub scale: f64,
    pub chunk: Option<usize>,
    pub dtype: DType,
    /// The backward takes the saved forward of [`crate::ops::mlstm::mlstm_for_backward`]
    /// instead of recomputing it.
    pub saved_forward: bool,
}

/// The tensors of an [`MlstmCase`], owned.
#[derive(Clone, Debug)]
pub struct MlstmTensors {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub i: Tensor,
    pub f: Tensor,
    pub initial: Option<crate::ops::mlstm::MlstmState>,
    pub chunk: Option<usize>,
}

impl MlstmTensors {
    pub fn inputs(&self) -> crate::ops::mlstm::MlstmInputs<'_> {
        crate::ops::mlstm::MlstmInputs {
            initial: self.initial.as_ref(),
            chunk: self.chunk,
            ..crate::ops::mlstm::MlstmInputs::new(&self.q, &self.k, &self.v, &self.i, &self.f)
        }
    }

    pub fn to_device(&self, device: &Device) -> Result<MlstmTensors> {
        Ok(MlstmTensors {
            q: self.q.to_device(device)?,
            k: self.k.to_device(device)?,
            v: self.v.to_device(device)?,
            i: self.i.to_device(device)?,
            f: self.f.to_device(device)?,
            initial: self.initial.as_ref().map(|s| s.to_device(device)).transpose()?,
            chunk: self.chunk,
        })
    }
}

impl MlstmCase {
    /// Gates as xLSTM's layers see them early in training: i in [-3, 3], f in [-2, 6].
    pub fn new(batch: usize, heads: usize, len: usize, dqk: usize, dhv: usize, dtype: DType) -> MlstmCase {
        MlstmCase {
            batch,
            heads,
            len,
            dqk,
            dhv,
            with_init: false,
            with_dfinal: false,
            i_range: (-3.0, 3.0),
            f_range: (-2.0, 6.0),
            scale: 1.0,
            chunk: None,
            dtype,
            saved_forward: false,
        }
    }

    /// Strongly negative forget gates and large input gates: the max state moves by tens
    /// every step.
    pub fn extreme_gates(self) -> MlstmCase {
        MlstmCase { i_range: (5.0, 30.0), f_range: (-30.0, -5.0), ..self }
    }

    /// [`MlstmCase::extreme_gates`] when `extreme`, else the case as it is.
    pub fn with_extreme_gates(self, extreme: bool) -> MlstmCase {
        if extreme {
            self.extreme_gates()
        } else {
            self
        }
    }

    /// For gradient checks: extreme gates when `extreme`, except in f16, which keeps the
    /// normal gates: the extreme gates' gradients (~1 / d, d down to exp(-30)) leave its range.
    pub fn with_extreme_gates_for_grads(self, extreme: bool) -> MlstmCase {
        let representable = self.dtype != DType::F16;
        self.with_extreme_gates(extreme && representable)
    }

    fn state_dims(&self) -> (usize, usize, usize, usize) {
        (self.batch, self.heads, self.dqk, self.dhv)
    }

    fn random_state(&self, rng: &mut Rng, m_range: (f64, f64)) -> Result<crate::ops::mlstm::MlstmState> {
        let (b, h, dk, dv) = self.state_dims();
        let mut gen = |n: usize, lo: f64, hi: f64| -> Vec<f32> { (0..n).map(|_| rng.uniform(lo, hi) as f32).collect() };
        let dev = Device::Cpu;
        Ok(crate::ops::mlstm::MlstmState {
            c: Tensor::from_f32(&gen(b * h * dk * dv, -1.0, 1.0), &[b, h, dk, dv], DType::F32, &dev)?,
            n: Tensor::from_f32(&gen(b * h * dk, -1.0, 1.0), &[b, h, dk], DType::F32, &dev)?,
            m: Tensor::from_f32(&gen(b * h, m_range.0, m_range.1), &[b, h], DType::F32, &dev)?,
        })
    }

    /// Inputs on the host.
    pub fn tensors(&self, rng: &mut Rng) -> Result<MlstmTensors> {
        let dev = Device::Cpu;
        let (b, h, l) = (self.batch, self.heads, self.len);
        let mut gen = |n: usize, lo: f64, hi: f64| -> Vec<f32> { (0..n).map(|_| rng.uniform(lo, hi) as f32).collect() };
        let s = self.scale;
        let q = Tensor::from_f32(&gen(b * h * l * self.dqk, -s, s), &[b, h, l, self.dqk], self.dtype, &dev)?;
        let k = Tensor::from_f32(&gen(b * h * l * self.dqk, -s, s), &[b, h, l, self.dqk], self.dtype, &dev)?;
        let v = Tensor::from_f32(&gen(b * h * l * self.dhv, -s, s), &[b, h, l, self.dhv], self.dtype, &dev)?;
        let i = Tensor::from_f32(&gen(b * h * l, self.i_range.0, self.i_range.1), &[b, h, l], DType::F32, &dev)?;
        let f = Tensor::from_f32(&gen(b * h * l, self.f_range.0, self.f_range.1), &[b, h, l], DType::F32, &dev)?;
        let initial = self.with_init.then(|| self.random_state(rng, (-2.0, 2.0))).transpose()?;
        Ok(MlstmTensors { q, k, v, i, f, initial, chunk: self.chunk })
    }

    /// The forward on `device` against the f64 recurrence: `(name, error)` of h
    /// ([`scaled_error`] against [`crate::ops::mlstm::cpu::h_magnitude`]) and the final C, n
    /// and m ([`relative_error`]).
    pub fn run_forward(&self, seed: u64, device: &Device) -> Result<Vec<(&'static str, f64)>> {
        use crate::ops::mlstm::{cpu, mlstm};
        let host = self.tensors(&mut Rng::new(seed))?;
        let p = host.inputs().to_f64()?;
        let r = cpu::forward_recurrent(&p);
        let dev_t = host.to_device(device)?;
        let out = mlstm(&dev_t.inputs())?;
        Ok(vec![
            ("h", scaled_error(&out.h.to_f64_vec()?, &r.h, &cpu::h_magnitude(&p))),
            ("final.c", tensor_error(&out.final_state.c, &r.final_state.c)?),
            ("final.n", tensor_error(&out.final_state.n, &r.final_state.n)?),
            ("final.m", tensor_error(&out.final_state.m, &r.final_state.m)?),
        ])
    }

    /// Every gradient on `device` against the f64 reference backward: `(name, error,
    /// conditioning)`. The error is [`relative_error`] for dv and the initial C and n, and
    /// [`scaled_error`] for dq, dk, di, df and the initial m against the sizes of the terms
    /// they sum (see the body); conditioning is [`mlstm_grad_conditioning`] of that gradient.
    pub fn run_backward(
        &self,
        seed: u64,
        device: &Device,
        mode: crate::ops::mlstm::NormalizerGrad,
    ) -> Result<Vec<(&'static str, f64, f64)>> {
        use crate::ops::mlstm::{cpu, mlstm_backward, mlstm_for_backward};
        let mut rng = Rng::new(seed);
        let host = self.tensors(&mut rng)?;
        let (b, h, l) = (self.batch, self.heads, self.len);
        let dh_v: Vec<f32> = (0..b * h * l * self.dhv).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let dh = Tensor::from_f32(&dh_v, &[b, h, l, self.dhv], self.dtype, &Device::Cpu)?;
        let dfinal = self.with_dfinal.then(|| self.random_state(&mut rng, (-1.0, 1.0))).transpose()?;
        let p = host.inputs().to_f64()?;
        let dfinal64 = dfinal
            .as_ref()
            .map(|s| -> Result<cpu::State64> {
                Ok(cpu::State64 { c: s.c.to_f64_vec()?, n: s.n.to_f64_vec()?, m: s.m.to_f64_vec()? })
            })
            .transpose()?;
        let g_ref = cpu::backward(&p, &dh.to_f64_vec()?, dfinal64.as_ref(), mode);
        let dev_t = host.to_device(device)?;
        let dfinal_d = dfinal.as_ref().map(|s| s.to_device(device)).transpose()?;
        let saved = self.saved_forward.then(|| mlstm_for_backward(&dev_t.inputs())).transpose()?;
        let g = mlstm_backward(&dev_t.inputs(), &dh.to_device(device)?, dfinal_d.as_ref(), mode, saved.as_ref())?;
        let (gi, ri) = (g.dinitial.as_ref(), g_ref.dinitial.as_ref());
        let state_err = |pick: fn(&crate::ops::mlstm::MlstmState) -> &Tensor,
                         pick64: fn(&cpu::State64) -> &Vec<f64>| {
            match (gi, ri) {
                // The reference as f32 holds it: a state that decayed below f32's range (the
                // initial state's weight after steps of extreme forget gates) is 0 there.
                (Some(a), Some(b)) => {
                    tensor_error(pick(a), &pick64(b).iter().map(|&x| f64::from(x as f32)).collect::<Vec<_>>())
                }
                (None, None) => Ok(0.0),
                _ => Ok(f64::INFINITY),
            }
        };
        let dh64 = dh.to_f64_vec()?;
        let cond = mlstm_grad_conditioning(&p, &dh64, dfinal64.as_ref(), mode, &g_ref);
        // The sizes of the terms each gradient sums, for [`scaled_error`]. Exact mode adds
        // the denominator's share (through dn, and m) to the numerator's (the Constant
        // gradient), and the two cancel where h hardly depends on the scale of q~ . n (one
        // step from a zero state: dq is exactly eps-small): |numerator's| + |denominator's|.
        // di = c (+ Exact's share through m), c = k . dk a sum over dqk: sum |k dk|. df sums
        // r[u] - c[u] over u >= t (r = q . dq), nearly equal terms: their sizes' reverse sum,
        // times sigmoid(-f). r and c take dq's and dk's own term sizes, not |dq| and |dk|:
        // in Exact mode the reference dq, dk are themselves cancelling sums (eps-small for
        // one step), while a kernel forms r from terms (h . dh, den . dn) that do not cancel.
        let g_num = match mode {
            crate::ops::mlstm::NormalizerGrad::Exact => {
                cpu::backward(&p, &dh64, dfinal64.as_ref(), crate::ops::mlstm::NormalizerGrad::Constant)
            }
            crate::ops::mlstm::NormalizerGrad::Constant => g_ref.clone(),
        };
        let split = |all: &[f64], num: &[f64]| -> Vec<f64> {
            all.iter().zip(num).map(|(a, n)| n.abs() + (a - n).abs()).collect()
        };
        let dqk = self.dqk;
        let abs_dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| (a * b).abs()).sum::<f64>();
        let (dq_size, dk_size) = (split(&g_ref.dq, &g_num.dq), split(&g_ref.dk, &g_num.dk));
        let mut df_size = split(&g_ref.df, &g_num.df);
        let mut di_size: Vec<f64> = g_ref.di.iter().zip(&g_num.di).map(|(a, n)| (a - n).abs()).collect();
        for hd in 0..b * h {
            let mut acc = 0.0;
            for t in (0..l).rev() {
                let row = hd * l + t;
                let span = row * dqk..(row + 1) * dqk;
                let (rs, cs) =
                    (abs_dot(&p.q[span.clone()], &dq_size[span.clone()]), abs_dot(&p.k[span.clone()], &dk_size[span]));
                acc += rs + cs;
                df_size[row] += acc * cpu::sigmoid(-p.f[row]);
                di_size[row] += cs;
            }
        }
        let scaled =
            |t: &Tensor, r: &[f64], size: &[f64]| -> Result<f64> { Ok(scaled_error(&t.to_f64_vec()?, r, size)) };
        // dm0 is <dC0, C0> + <dn0, n0> (plus, in Exact mode, the max state's chain): a sum of
        // dqk (dhv + 1) signed terms that can cancel to a small fraction of their sizes, where
        // a relative error says nothing. Against the sizes of those terms (dC0's and dn0's own
        // term sizes, as for dq) and of the rest.
        let dm0_err = match (gi, ri, p.initial.as_ref(), g_num.dinitial.as_ref()) {
            (Some(a), Some(r), Some(init), Some(num)) => {
                let (dc_size, dn_size) = (split(&r.c, &num.c), split(&r.n, &num.n));
                let (cs, ns) = (dqk * self.dhv, dqk);
                let size: Vec<f64> = (0..b * h)
                    .map(|hd| {
                        let (c, n) = (hd * cs..(hd + 1) * cs, hd * ns..(hd + 1) * ns);
                        let dots = r.c[c.clone()].iter().zip(&init.c[c.clone()]).map(|(x, y)| x * y).sum::<f64>()
                            + r.n[n.clone()].iter().zip(&init.n[n.clone()]).map(|(x, y)| x * y).sum::<f64>();
                        abs_dot(&dc_size[c.clone()], &init.c[c])
                            + abs_dot(&dn_size[n.clone()], &init.n[n])
                            + (r.m[hd] - dots).abs()
                    })
                    .collect();
                // As f32 holds them, like the other state gradients (an initial state decayed
                // below f32's range has no gradient there).
                let f32_round = |v: &[f64]| v.iter().map(|&x| f64::from(x as f32)).collect::<Vec<_>>();
                scaled(&a.m, &f32_round(&r.m), &f32_round(&size))?
            }
            (None, None, ..) => 0.0,
            _ => f64::INFINITY,
        };
        let errs = vec![
            ("dq", scaled(&g.dq, &g_ref.dq, &dq_size)?),
            ("dk", scaled(&g.dk, &g_ref.dk, &dk_size)?),
            ("dv", tensor_error(&g.dv, &g_ref.dv)?),
            ("di", scaled(&g.di, &g_ref.di, &di_size)?),
            ("df", scaled(&g.df, &g_ref.df, &df_size)?),
            ("dinitial.c", state_err(|s| &s.c, |s| &s.c)?),
            ("dinitial.n", state_err(|s| &s.n, |s| &s.n)?),
            ("dinitial.m", dm0_err),
        ];
        Ok(errs.into_iter().zip(cond).map(|((n, e), (_, c))| (n, e, c)).collect())
    }
}

/// The relative perturbation [`mlstm_grad_conditioning`] applies.
const CONDITIONING_STEP: f64 = 1e-7;

/// How much the mLSTM gradients amplify relative perturbations of the inputs, per gradient
/// (dq, dk, dv, di, df, dinitial.c, .n, .m): the relative change of the f64 reference
/// backward when every input (q, k, v, i, f, dh, the states) moves by a random ±1e-7 of
/// itself, over 1e-7, divided by 8 (what well-conditioned problems measure, a few input
/// terms per output) and at least 1. Rounding inside a kernel moves its inputs' products
/// by as much, so a gradient's error grows with this factor: where the denominator's terms
/// cancel (d small, h and its gradients large), or where a gradient is a difference of
/// nearly equal terms (dq when h hardly depends on q's length; df of a single step), plain
/// relative error against the tiny or sensitive reference says nothing about the kernel.
/// The GPU tests allow [`mlstm_grad_tolerance`] times this.
pub fn mlstm_grad_conditioning(
    p: &crate::ops::mlstm::cpu::Mlstm64,
    dh: &[f64],
    dfinal: Option<&crate::ops::mlstm::cpu::State64>,
    mode: crate::ops::mlstm::NormalizerGrad,
    reference: &crate::ops::mlstm::cpu::Grads64,
) -> Vec<(&'static str, f64)> {
    use crate::ops::mlstm::cpu;
    let mut rng = Rng::new(0x5eed_c0de);
    let mut nudge = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .map(|x| x * (1.0 + CONDITIONING_STEP * if rng.uniform(-1.0, 1.0) < 0.0 { -1.0 } else { 1.0 }))
            .collect()
    };
    let mut state = |s: &cpu::State64| cpu::State64 { c: nudge(&s.c), n: nudge(&s.n), m: nudge(&s.m) };
    let initial = p.initial.as_ref().map(&mut state);
    let dfinal_p = dfinal.map(&mut state);
    let pp = cpu::Mlstm64 {
        q: nudge(&p.q),
        k: nudge(&p.k),
        v: nudge(&p.v),
        i: nudge(&p.i),
        f: nudge(&p.f),
        initial,
        ..p.clone()
    };
    let g = cpu::backward(&pp, &nudge(dh), dfinal_p.as_ref(), mode);
    let amp = |a: &[f64], b: &[f64]| (relative_error(a, b) / CONDITIONING_STEP / 8.0).max(1.0);
    let st = |pick: fn(&cpu::State64) -> &Vec<f64>| match (&g.dinitial, &reference.dinitial) {
        (Some(a), Some(b)) => amp(pick(a), pick(b)),
        _ => 1.0,
    };
    vec![
        ("dq", amp(&g.dq, &reference.dq)),
        ("dk", amp(&g.dk, &reference.dk)),
        ("dv", amp(&g.dv, &reference.dv)),
        ("di", amp(&g.di, &reference.di)),
        ("df", amp(&g.df, &reference.df)),
        ("dinitial.c", st(|s| &s.c)),
        ("dinitial.n", st(|s| &s.n)),
        ("dinitial.m", st(|s| &s.m)),
    ]
}

/// Decoding an [`MlstmCase`] token by token with `mlstm_step` from its initial state
/// against one `mlstm` pass over the sequence, both on `device`: the error of h (all tokens;
/// [`scaled_error`] as in [`MlstmCase::run_forward`]) and the relative errors of the final
/// C, n and m.
pub fn decode_against_mlstm(case: &MlstmCase, seed: u64, device: &Device) -> Result<[f64; 4]> {
    use crate::ops::mlstm::{mlstm, mlstm_step, MlstmState};
    let host = case.tensors(&mut Rng::new(seed))?;
    let dev_t = host.to_device(device)?;
    let seq = mlstm(&dev_t.inputs())?;
    let (b, h, l, dk, dv) = (case.batch, case.heads, case.len, case.dqk, case.dhv);
    let mut state = match &dev_t.initial {
        Some(s) => s.clone(),
        None => MlstmState::zeros(b, h, dk, dv, device)?,
    };
    let (q, k, v) = (host.q.to_f32_vec()?, host.k.to_f32_vec()?, host.v.to_f32_vec()?);
    let (ig, fg) = (host.i.to_f32_vec()?, host.f.to_f32_vec()?);
    let mut outs = vec![0.0f64; b * h * l * dv];
    let pick = |x: &[f32], t: usize, d: usize| -> Vec<f32> {
        (0..b * h).flat_map(|hd| x[(hd * l + t) * d..(hd * l + t + 1) * d].to_vec()).collect()
    };
    for t in 0..l {
        let qt = Tensor::from_f32(&pick(&q, t, dk), &[b, h, dk], case.dtype, device)?;
        let kt = Tensor::from_f32(&pick(&k, t, dk), &[b, h, dk], case.dtype, device)?;
        let vt = Tensor::from_f32(&pick(&v, t, dv), &[b, h, dv], case.dtype, device)?;
        let it = Tensor::from_f32(&pick(&ig, t, 1), &[b, h], DType::F32, device)?;
        let ft = Tensor::from_f32(&pick(&fg, t, 1), &[b, h], DType::F32, device)?;
        let y = mlstm_step(&mut state, &qt, &kt, &vt, &it, &ft, crate::ops::mlstm::DEFAULT_EPS)?.to_f64_vec()?;
        for hd in 0..b * h {
            outs[(hd * l + t) * dv..(hd * l + t + 1) * dv].copy_from_slice(&y[hd * dv..(hd + 1) * dv]);
        }
    }
    let magnitude = crate::ops::mlstm::cpu::h_magnitude(&host.inputs().to_f64()?);
    Ok([
        scaled_error(&outs, &seq.h.to_f64_vec()?, &magnitude),
        tensor_error(&state.c, &seq.final_state.c.to_f64_vec()?)?,
        tensor_error(&state.n, &seq.final_state.n.to_f64_vec()?)?,
        tensor_error(&state.m, &seq.final_state.m.to_f64_vec()?)?,
    ])
}
