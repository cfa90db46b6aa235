//! The selective scan's check cases: output, last state and every gradient against the f64
//! reference, and decoding token by token against the scan.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::measure::{optional_error, relative_error_in, rounding_tolerance, tensor_error, CheckRow};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Tolerance of the selective scan's outputs and gradients ([`crate::measure::relative_error_in`]
/// against the f64 reference on the same rounded inputs). The kernels compute in f32 (exp
/// through ex2.approx, relative error ~2^-22) and round each output once: the f32 error of
/// sums over up to a few thousand steps and channels (1e-4 leaves ~10x headroom over what is
/// measured) plus one rounding of each output, allowed twice.
pub fn scan_tolerance(dtype: DType) -> f64 {
    rounding_tolerance(dtype, 2.0, 1e-4)
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
        relative_error_in(&outs, &scan.out.to_f64_vec()?, case.dtype),
        tensor_error(&state, &scan.last_state.to_f64_vec()?)?,
    ))
}

/// `check`'s selective-scan rows: output, last state and every gradient (the worst of them)
/// per dtype, over odd sizes and every combination of the optional inputs.
pub fn check_rows(device: &Device, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    // (batch, dim, dstate, len, groups, option bits of ScanCase::from_option_bits)
    let cases: &[(usize, usize, usize, usize, usize, u32)] = &[
        (1, 1, 1, 1, 1, 0b11_1111_1100),
        (2, 7, 16, 33, 1, 0b01_0111_1100),
        (3, 66, 16, 1025, 2, 0b11_1111_1100),
        (1, 33, 4, 257, 1, 0b10_1000_0011),
        (2, 8, 64, 300, 4, 0b11_0111_1110),
        (1, 5, 256, 70, 1, 0b11_1111_1101),
    ];
    let mut rows = Vec::new();
    for dtype in DType::ALL {
        let mut worst = 0.0f64;
        for &(batch, dim, dstate, len, groups, flags) in cases {
            let case = ScanCase::from_option_bits(batch, dim, dstate, len, groups, flags, dtype);
            worst = case.run(rng.next_u64(), device)?.into_iter().fold(worst, |w, (_, e)| w.max(e));
        }
        let tolerance = scan_tolerance(dtype);
        rows.push(CheckRow { kernel: "selective_scan fwd+grads", dtype, cases: cases.len(), worst, tolerance });
    }
    Ok(rows)
}
