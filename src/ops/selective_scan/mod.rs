//! Mamba's fused selective scan, forward and backward, with mamba-ssm's semantics
//! (`selective_scan_fn`; the math is in [`cpu`]):
//!
//! - `u`, `delta`, `z`, `out`: `(batch, dim, len)`, element type f32, bf16 or f16;
//! - `A`: `(dim, dstate)` f32; `D`, `delta_bias`: `(dim)` f32;
//! - `B`, `C`: time-varying `(batch, groups, dstate, len)` in the element type (`groups`
//!   divides `dim`; channel `d` reads group `d / (dim / groups)`), or constant `(dim, dstate)`
//!   f32;
//! - states (`h0`, the last state): `(batch, dim, dstate)` f32. Arithmetic is f32 on the GPU.
//!
//! Beyond mamba-ssm: an initial state `h0` and its gradient, a gradient into the returned
//! last state, per-sequence resets for packed batches ([`SequenceResets`]), and a backward
//! that is always deterministic (fixed-order sums, no float atomics: repeated calls agree
//! bit for bit). `dstate` up to [`MAX_DSTATE`]; any `len` (time is walked in tiles, states
//! carried between them).
//!
//! The backward recomputes the forward instead of storing per-step states. It starts from
//! the states saved every [`ScanCheckpoints::interval`] steps, which
//! [`selective_scan_for_backward`] returns with the output (`batch * dim * dstate *
//! ceil(len / interval)` f32); without them the backward first reruns the forward to make them.

pub mod bench;
pub mod check;
pub(crate) mod cli;
pub mod cpu;
mod cuda;

/// The selective scan in the CLI's `check`, `bench scan` and `run`.
pub const ENTRY: crate::ops::registry::OpEntry = crate::ops::registry::OpEntry {
    name: "selective_scan",
    bench_group: "scan",
    check: check::check_rows,
    bench: bench::bench_rows,
    run: cli::COMMANDS,
};

pub use super::sequence_resets::SequenceResets;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Largest state size the kernels take (states per channel spread over up to 32 lanes of 8).
pub const MAX_DSTATE: usize = 256;

/// The inputs of one scan. Build with [`ScanInputs::new`] and set the optional fields:
///
/// ```no_run
/// # use hybrid_kernels::{ops::selective_scan::*, Tensor};
/// # fn f(u: &Tensor, delta: &Tensor, a: &Tensor, b: &Tensor, c: &Tensor, z: &Tensor, bias: &Tensor)
/// # -> hybrid_kernels::Result<()> {
/// let inputs = ScanInputs { z: Some(z), delta_bias: Some(bias), delta_softplus: true, ..ScanInputs::new(u, delta, a, b, c) };
/// let out = selective_scan(&inputs)?;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ScanInputs<'a> {
    pub u: &'a Tensor,
    pub delta: &'a Tensor,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub c: &'a Tensor,
    /// The skip term's weight `D`.
    pub d: Option<&'a Tensor>,
    /// The gate: `out = y SiLU(z)`.
    pub z: Option<&'a Tensor>,
    pub delta_bias: Option<&'a Tensor>,
    /// `dt = softplus(delta + delta_bias)` (PyTorch's softplus, linear above 20).
    pub delta_softplus: bool,
    pub h0: Option<&'a Tensor>,
    pub resets: Option<&'a SequenceResets>,
}

impl<'a> ScanInputs<'a> {
    /// The required inputs; no D, z, bias, softplus, initial state or resets.
    pub fn new(u: &'a Tensor, delta: &'a Tensor, a: &'a Tensor, b: &'a Tensor, c: &'a Tensor) -> ScanInputs<'a> {
        ScanInputs {
            u,
            delta,
            a,
            b,
            c,
            d: None,
            z: None,
            delta_bias: None,
            delta_softplus: false,
            h0: None,
            resets: None,
        }
    }
}

/// The output of a scan: `out` `(batch, dim, len)` and the state after the last step
/// `(batch, dim, dstate)` f32 (the initial state when `len` is 0).
#[derive(Clone, Debug)]
pub struct ScanOutput {
    pub out: Tensor,
    pub last_state: Tensor,
}

/// States saved by [`selective_scan_for_backward`] every `interval` steps, where the
/// backward restarts its recomputation. Opaque: valid only with the same inputs.
#[derive(Clone, Debug)]
pub struct ScanCheckpoints {
    states: Option<Tensor>,
    interval: usize,
}

impl ScanCheckpoints {
    pub fn interval(&self) -> usize {
        self.interval
    }
    /// Device bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.states.as_ref().map_or(0, Tensor::size_in_bytes)
    }
}

/// Gradients of `sum(out * dout) + sum(last_state * dlast_state)`, each shaped and typed as
/// its input (`dh0` f32 like `h0`).
#[derive(Clone, Debug)]
pub struct ScanGrads {
    pub du: Tensor,
    pub ddelta: Tensor,
    pub da: Tensor,
    pub db: Tensor,
    pub dc: Tensor,
    pub dd: Option<Tensor>,
    pub dz: Option<Tensor>,
    pub ddelta_bias: Option<Tensor>,
    pub dh0: Option<Tensor>,
}

/// The validated sizes of a scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanDims {
    pub batch: usize,
    pub dim: usize,
    pub dstate: usize,
    pub len: usize,
    /// Groups of the time-varying B / C; 1 when both are constant.
    pub groups: usize,
    pub b_variable: bool,
    pub c_variable: bool,
    pub dtype: DType,
}

impl ScanDims {
    pub fn state_shape(&self) -> [usize; 3] {
        [self.batch, self.dim, self.dstate]
    }
}

/// How `B` or `C` is given: `Some(groups)` when time-varying.
fn bc_layout(
    arg: &'static str,
    t: &Tensor,
    batch: usize,
    dim: usize,
    len: usize,
    dtype: DType,
) -> Result<Option<(usize, usize)>> {
    match t.shape() {
        &[bb, g, n, l] => {
            if bb != batch || l != len || g == 0 || dim % g != 0 {
                return Err(Error::invalid(
                    arg,
                    format!("shape (batch {batch}, groups dividing dim {dim}, dstate, len {len}) or (dim, dstate)"),
                    format!("shape {:?}", t.shape()),
                ));
            }
            t.expect_dtype(arg, dtype)?;
            Ok(Some((g, n)))
        }
        &[d, _] if d == dim => {
            t.expect_dtype(arg, DType::F32)?;
            Ok(None)
        }
        s => Err(Error::invalid(
            arg,
            format!("shape (batch {batch}, groups, dstate, len {len}) or (dim {dim}, dstate)"),
            format!("shape {s:?}"),
        )),
    }
}

/// `A`: `(dim, dstate)` f32 with dstate in 1..=MAX_DSTATE; returns dstate.
fn state_size(a: &Tensor, dim: usize) -> Result<usize> {
    let &[ad, dstate] = a.shape() else {
        return Err(Error::invalid("A", "shape (dim, dstate)", format!("shape {:?}", a.shape())));
    };
    if ad != dim || dstate == 0 || dstate > MAX_DSTATE {
        return Err(Error::invalid(
            "A",
            format!("shape (dim {dim}, dstate in 1..={MAX_DSTATE})"),
            format!("shape {:?}", a.shape()),
        ));
    }
    a.expect_dtype("A", DType::F32)?;
    Ok(dstate)
}

/// The group count of B and C (each `Some(groups)` when time-varying): equal when both vary.
fn common_groups(b: Option<usize>, c: Option<usize>) -> Result<usize> {
    match (b, c) {
        (Some(gb), Some(gc)) if gb != gc => {
            Err(Error::invalid("C", format!("{gb} groups, as B"), format!("{gc} groups")))
        }
        (Some(g), _) | (None, Some(g)) => Ok(g),
        (None, None) => Ok(1),
    }
}

/// The optional per-channel f32 vectors (`D`, the dt bias): `(dim)` f32 each.
fn check_per_channel(dim: usize, args: [(&'static str, Option<&Tensor>); 2]) -> Result<()> {
    for (arg, t) in args {
        if let Some(t) = t {
            t.expect_shape(arg, &[dim])?;
            t.expect_dtype(arg, DType::F32)?;
        }
    }
    Ok(())
}

/// Every present tensor on `device`.
fn check_devices(device: &Device, named: &[(&'static str, Option<&Tensor>)]) -> Result<()> {
    for &(arg, t) in named {
        if let Some(t) = t {
            t.expect_device(arg, device)?;
        }
    }
    Ok(())
}

/// B or C widened for the reference, in the layout it was given in.
fn param64(t: &Tensor, variable: bool) -> Result<cpu::Param64> {
    let v = t.to_f64_vec()?;
    Ok(if variable { cpu::Param64::Variable(v) } else { cpu::Param64::Constant(v) })
}

impl ScanInputs<'_> {
    /// Checks every shape, element type and device; returns the sizes.
    pub fn dims(&self) -> Result<ScanDims> {
        let &[batch, dim, len] = self.u.shape() else {
            return Err(Error::invalid("u", "shape (batch, dim, len)", format!("shape {:?}", self.u.shape())));
        };
        let dtype = self.u.dtype();
        let device = self.u.device();
        let seq = [batch, dim, len];
        self.delta.expect_shape("delta", &seq)?;
        self.delta.expect_dtype("delta", dtype)?;
        let dstate = state_size(self.a, dim)?;
        let b = bc_layout("B", self.b, batch, dim, len, dtype)?;
        let c = bc_layout("C", self.c, batch, dim, len, dtype)?;
        for (arg, t, lay) in [("B", self.b, b), ("C", self.c, c)] {
            let n = lay.map_or(t.shape()[1], |(_, n)| n);
            if n != dstate {
                return Err(Error::invalid(arg, format!("dstate {dstate} (from A)"), format!("shape {:?}", t.shape())));
            }
        }
        let groups = common_groups(b.map(|(g, _)| g), c.map(|(g, _)| g))?;
        check_per_channel(dim, [("D", self.d), ("delta_bias", self.delta_bias)])?;
        if let Some(z) = self.z {
            z.expect_shape("z", &seq)?;
            z.expect_dtype("z", dtype)?;
        }
        if let Some(h0) = self.h0 {
            h0.expect_shape("h0", &[batch, dim, dstate])?;
            h0.expect_dtype("h0", DType::F32)?;
        }
        if let Some(r) = self.resets {
            r.expect_size(batch, len)?;
        }
        check_devices(
            &device,
            &[
                ("delta", Some(self.delta)),
                ("A", Some(self.a)),
                ("B", Some(self.b)),
                ("C", Some(self.c)),
                ("D", self.d),
                ("z", self.z),
                ("delta_bias", self.delta_bias),
                ("h0", self.h0),
                ("u", Some(self.u)),
            ],
        )?;
        // The output and the last state (which u with len 0 does not bound).
        let rows = batch.checked_mul(dim);
        crate::memory::check_buffers(
            &device,
            &[
                ("u", rows.and_then(|r| r.checked_mul(len)), dtype.size_in_bytes()),
                ("u", rows.and_then(|r| r.checked_mul(dstate)), 4),
            ],
        )?;
        Ok(ScanDims { batch, dim, dstate, len, groups, b_variable: b.is_some(), c_variable: c.is_some(), dtype })
    }

    /// The inputs widened to f64 for the reference.
    pub fn to_f64(&self) -> Result<cpu::Scan64> {
        let dims = self.dims()?;
        let opt = |t: Option<&Tensor>| t.map(Tensor::to_f64_vec).transpose();
        Ok(cpu::Scan64 {
            batch: dims.batch,
            dim: dims.dim,
            dstate: dims.dstate,
            len: dims.len,
            groups: dims.groups,
            u: self.u.to_f64_vec()?,
            delta: self.delta.to_f64_vec()?,
            a: self.a.to_f64_vec()?,
            b: param64(self.b, dims.b_variable)?,
            c: param64(self.c, dims.c_variable)?,
            d: opt(self.d)?,
            z: opt(self.z)?,
            delta_bias: opt(self.delta_bias)?,
            delta_softplus: self.delta_softplus,
            h0: opt(self.h0)?,
            resets: self.resets.map(|r| r.flags().to_vec()),
        })
    }
}

/// The scan's output and last state.
pub fn selective_scan(inputs: &ScanInputs) -> Result<ScanOutput> {
    forward(inputs, false).map(|(o, _)| o)
}

/// The scan's output and last state, and the checkpoints that
/// [`selective_scan_backward`] restarts from.
pub fn selective_scan_for_backward(inputs: &ScanInputs) -> Result<(ScanOutput, ScanCheckpoints)> {
    forward(inputs, true)
}

fn forward(inputs: &ScanInputs, checkpoints: bool) -> Result<(ScanOutput, ScanCheckpoints)> {
    let dims = inputs.dims()?;
    match inputs.u.device() {
        Device::Cpu => {
            let f = cpu::forward(&inputs.to_f64()?);
            let out = Tensor::from_f64_rounded(&f.out, inputs.u.shape(), dims.dtype)?;
            let last_state = Tensor::from_f64_rounded(&f.last_state, &dims.state_shape(), DType::F32)?;
            Ok((ScanOutput { out, last_state }, ScanCheckpoints { states: None, interval: 0 }))
        }
        Device::Cuda(dev) => cuda::forward(&dev, inputs, &dims, checkpoints),
    }
}

/// Gradients of `sum(out * dout) + sum(last_state * dlast_state)`. `dout` is shaped and
/// typed like `u`; `dlast_state` like the last state. `checkpoints` from
/// [`selective_scan_for_backward`] on the same inputs save a forward pass.
pub fn selective_scan_backward(
    inputs: &ScanInputs,
    dout: &Tensor,
    dlast_state: Option<&Tensor>,
    checkpoints: Option<&ScanCheckpoints>,
) -> Result<ScanGrads> {
    let dims = inputs.dims()?;
    let device = inputs.u.device();
    dout.expect_shape("dout", inputs.u.shape())?;
    dout.expect_dtype("dout", dims.dtype)?;
    dout.expect_device("dout", &device)?;
    if let Some(t) = dlast_state {
        t.expect_shape("dlast_state", &dims.state_shape())?;
        t.expect_dtype("dlast_state", DType::F32)?;
        t.expect_device("dlast_state", &device)?;
    }
    match device {
        Device::Cpu => {
            let p = inputs.to_f64()?;
            let dlast = dlast_state.map(Tensor::to_f64_vec).transpose()?;
            let g = cpu::backward(&p, &dout.to_f64_vec()?, dlast.as_deref());
            let dt = dims.dtype;
            let like = |v: &[f64], t: &Tensor| Tensor::from_f64_rounded(v, t.shape(), t.dtype());
            Ok(ScanGrads {
                du: Tensor::from_f64_rounded(&g.du, inputs.u.shape(), dt)?,
                ddelta: Tensor::from_f64_rounded(&g.ddelta, inputs.u.shape(), dt)?,
                da: like(&g.da, inputs.a)?,
                db: like(&g.db, inputs.b)?,
                dc: like(&g.dc, inputs.c)?,
                dd: g.dd.zip(inputs.d).map(|(v, t)| like(&v, t)).transpose()?,
                dz: g.dz.zip(inputs.z).map(|(v, t)| like(&v, t)).transpose()?,
                ddelta_bias: g.ddelta_bias.zip(inputs.delta_bias).map(|(v, t)| like(&v, t)).transpose()?,
                dh0: g.dh0.zip(inputs.h0).map(|(v, t)| like(&v, t)).transpose()?,
            })
        }
        Device::Cuda(dev) => cuda::backward(&dev, inputs, &dims, dout, dlast_state, checkpoints),
    }
}

/// The inputs of one decoding step ([`selective_state_update`]): `x`, `dt`, `z` `(batch,
/// dim)` in the element type; `A` `(dim, dstate)` f32; `B`, `C` `(batch, groups, dstate)` in
/// the element type or constant `(dim, dstate)` f32; `D`, `dt_bias` `(dim)` f32.
#[derive(Clone, Copy, Debug)]
pub struct StepInputs<'a> {
    pub x: &'a Tensor,
    pub dt: &'a Tensor,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub c: &'a Tensor,
    pub d: Option<&'a Tensor>,
    pub z: Option<&'a Tensor>,
    pub dt_bias: Option<&'a Tensor>,
    pub dt_softplus: bool,
}

impl<'a> StepInputs<'a> {
    pub fn new(x: &'a Tensor, dt: &'a Tensor, a: &'a Tensor, b: &'a Tensor, c: &'a Tensor) -> StepInputs<'a> {
        StepInputs { x, dt, a, b, c, d: None, z: None, dt_bias: None, dt_softplus: false }
    }

    /// Checks shapes, element types and devices against `state` `(batch, dim, dstate)` f32.
    fn dims(&self, state: &Tensor) -> Result<ScanDims> {
        let &[batch, dim] = self.x.shape() else {
            return Err(Error::invalid("x", "shape (batch, dim)", format!("shape {:?}", self.x.shape())));
        };
        let dtype = self.x.dtype();
        let device = self.x.device();
        self.dt.expect_shape("dt", &[batch, dim])?;
        self.dt.expect_dtype("dt", dtype)?;
        let dstate = state_size(self.a, dim)?;
        state.expect_shape("state", &[batch, dim, dstate])?;
        state.expect_dtype("state", DType::F32)?;
        let layout = |arg: &'static str, t: &Tensor| -> Result<Option<usize>> {
            match t.shape() {
                &[bb, g, n] if bb == batch && g > 0 && dim % g == 0 && n == dstate => {
                    t.expect_dtype(arg, dtype)?;
                    Ok(Some(g))
                }
                &[d, n] if d == dim && n == dstate => {
                    t.expect_dtype(arg, DType::F32)?;
                    Ok(None)
                }
                s => Err(Error::invalid(
                    arg,
                    format!(
                        "shape (batch {batch}, groups dividing {dim}, dstate {dstate}) or (dim {dim}, dstate {dstate})"
                    ),
                    format!("shape {s:?}"),
                )),
            }
        };
        let (gb, gc) = (layout("B", self.b)?, layout("C", self.c)?);
        let groups = common_groups(gb, gc)?;
        check_per_channel(dim, [("D", self.d), ("dt_bias", self.dt_bias)])?;
        if let Some(z) = self.z {
            z.expect_shape("z", &[batch, dim])?;
            z.expect_dtype("z", dtype)?;
        }
        check_devices(
            &device,
            &[
                ("dt", Some(self.dt)),
                ("A", Some(self.a)),
                ("B", Some(self.b)),
                ("C", Some(self.c)),
                ("D", self.d),
                ("z", self.z),
                ("dt_bias", self.dt_bias),
                ("state", Some(state)),
                ("x", Some(self.x)),
            ],
        )?;
        Ok(ScanDims { batch, dim, dstate, len: 1, groups, b_variable: gb.is_some(), c_variable: gc.is_some(), dtype })
    }
}

/// One decoding step, mamba's `selective_state_update`: advances `state` `(batch, dim,
/// dstate)` f32 in place by one token and returns that token's output `(batch, dim)`. The
/// state layout is the scan's (`h0`, `last_state`), so a prefill by [`selective_scan`] hands
/// over to decoding directly, and stepping through a sequence reproduces the scan.
pub fn selective_state_update(state: &mut Tensor, inputs: &StepInputs) -> Result<Tensor> {
    let dims = inputs.dims(state)?;
    match inputs.x.device() {
        Device::Cpu => {
            let opt = |t: Option<&Tensor>| t.map(Tensor::to_f64_vec).transpose();
            let p = cpu::Scan64 {
                batch: dims.batch,
                dim: dims.dim,
                dstate: dims.dstate,
                len: 1,
                groups: dims.groups,
                u: inputs.x.to_f64_vec()?,
                delta: inputs.dt.to_f64_vec()?,
                a: inputs.a.to_f64_vec()?,
                b: param64(inputs.b, dims.b_variable)?,
                c: param64(inputs.c, dims.c_variable)?,
                d: opt(inputs.d)?,
                z: opt(inputs.z)?,
                delta_bias: opt(inputs.dt_bias)?,
                delta_softplus: inputs.dt_softplus,
                h0: Some(state.to_f64_vec()?),
                resets: None,
            };
            let f = cpu::forward(&p);
            *state = Tensor::from_f64_rounded(&f.last_state, &dims.state_shape(), DType::F32)?;
            Tensor::from_f64_rounded(&f.out, &[dims.batch, dims.dim], dims.dtype)
        }
        Device::Cuda(dev) => cuda::state_update(&dev, state, inputs, &dims),
    }
}
