//! The mLSTM cell of xLSTM with exponential input gate (NX-AI mlstm_kernels' mLSTMexp; the
//! math is in [`cpu`]), computed chunkwise on the GPU in the style of tiled flash linear
//! attention: the state is carried across chunks of the sequence, each chunk's outputs come
//! from the carried state plus a causal, gated attention inside the chunk.
//!
//! - `q`, `k`: `(batch, heads, len, dqk)`; `v`, `h`: `(batch, heads, len, dhv)`; element
//!   type f32, bf16 or f16 (all four alike). `dqk` and `dhv` may differ.
//! - `i`, `f`: input and forget gate preactivations `(batch, heads, len)`, f32.
//! - States ([`MlstmState`]), f32: C `(batch, heads, dqk, dhv)`, n `(batch, heads, dqk)`,
//!   m `(batch, heads)`; optional at the start (zeros otherwise), always returned at the end,
//!   and the decoding step's state ([`mlstm_step`]).
//!
//! Arithmetic is f32 on the GPU with bf16/f16 products on tensor cores; each output is
//! rounded once. Non-finite inputs propagate as the arithmetic does.

pub mod bench;
pub mod check;
pub(crate) mod cli;
pub mod cpu;
mod cuda;

/// The mLSTM in the CLI's `check`, `bench mlstm` and `run`.
pub const ENTRY: crate::ops::registry::OpEntry = crate::ops::registry::OpEntry {
    name: "mlstm",
    bench_group: "mlstm",
    check: check::check_rows,
    bench: bench::bench_rows,
    run: cli::COMMANDS,
};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
pub use cpu::NormalizerGrad;

/// mlstm_kernels' default denominator guard.
pub const DEFAULT_EPS: f32 = 1e-6;

/// Largest head dimension (dqk and dhv) the GPU kernels take.
pub const MAX_HEAD_DIM: usize = 512;

/// The recurrent state of every head, f32: C `(batch, heads, dqk, dhv)`, n `(batch, heads,
/// dqk)`, m `(batch, heads)`.
#[derive(Clone, Debug)]
pub struct MlstmState {
    pub c: Tensor,
    pub n: Tensor,
    pub m: Tensor,
}

impl MlstmState {
    /// The state before any step (what the forward starts from without one).
    pub fn zeros(batch: usize, heads: usize, dqk: usize, dhv: usize, device: &Device) -> Result<MlstmState> {
        let named = |e| match e {
            Error::HostOutOfMemory { requested_bytes, available_bytes, .. } => {
                Error::HostOutOfMemory { arg: "batch x heads x dqk x dhv", requested_bytes, available_bytes }
            }
            Error::InvalidArgument { expected, found, .. } => {
                Error::InvalidArgument { arg: "batch x heads x dqk x dhv", expected, found }
            }
            e => e,
        };
        Ok(MlstmState {
            c: Tensor::full(0.0, &[batch, heads, dqk, dhv], DType::F32, device).map_err(named)?,
            n: Tensor::full(0.0, &[batch, heads, dqk], DType::F32, device).map_err(named)?,
            m: Tensor::full(0.0, &[batch, heads], DType::F32, device).map_err(named)?,
        })
    }

    pub fn to_device(&self, device: &Device) -> Result<MlstmState> {
        Ok(MlstmState { c: self.c.to_device(device)?, n: self.n.to_device(device)?, m: self.m.to_device(device)? })
    }

    fn check(
        &self,
        prefix: StateArgs,
        batch: usize,
        heads: usize,
        dqk: usize,
        dhv: usize,
        device: &Device,
    ) -> Result<()> {
        for (arg, t, shape) in [
            (prefix.c, &self.c, vec![batch, heads, dqk, dhv]),
            (prefix.n, &self.n, vec![batch, heads, dqk]),
            (prefix.m, &self.m, vec![batch, heads]),
        ] {
            t.expect_shape(arg, &shape)?;
            t.expect_dtype(arg, DType::F32)?;
            t.expect_device(arg, device)?;
        }
        Ok(())
    }

    fn to_f64(&self) -> Result<cpu::State64> {
        Ok(cpu::State64 { c: self.c.to_f64_vec()?, n: self.n.to_f64_vec()?, m: self.m.to_f64_vec()? })
    }

    fn from_f64(s: &cpu::State64, batch: usize, heads: usize, dqk: usize, dhv: usize) -> Result<MlstmState> {
        Ok(MlstmState {
            c: Tensor::from_f64_rounded(&s.c, &[batch, heads, dqk, dhv], DType::F32)?,
            n: Tensor::from_f64_rounded(&s.n, &[batch, heads, dqk], DType::F32)?,
            m: Tensor::from_f64_rounded(&s.m, &[batch, heads], DType::F32)?,
        })
    }
}

/// Argument names of a state's three tensors in errors.
#[derive(Clone, Copy)]
struct StateArgs {
    c: &'static str,
    n: &'static str,
    m: &'static str,
}

const INITIAL: StateArgs = StateArgs { c: "initial.c", n: "initial.n", m: "initial.m" };
const DFINAL: StateArgs = StateArgs { c: "dfinal.c", n: "dfinal.n", m: "dfinal.m" };
const STATE: StateArgs = StateArgs { c: "state.c", n: "state.n", m: "state.m" };
const SAVED_FINAL: StateArgs =
    StateArgs { c: "saved.output.final_state.c", n: "saved.output.final_state.n", m: "saved.output.final_state.m" };

/// The inputs of one mLSTM sequence pass. Build with [`MlstmInputs::new`] and set options.
#[derive(Clone, Copy, Debug)]
pub struct MlstmInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub i: &'a Tensor,
    pub f: &'a Tensor,
    pub initial: Option<&'a MlstmState>,
    /// The denominator guard: `h = num / (max(|q~ . n|, exp(-m)) + eps)`.
    pub eps: f32,
    /// Steps per chunk on the GPU (16, 32, 64 or 128). `None` or 64 in bf16 / f16 with dqk up
    /// to 256 runs the fused forward (chunks of 64, tiles in registers); otherwise the chunked
    /// forward, where `None` picks 32, or smaller when the head dimensions need the shared
    /// memory. The backward's recomputation always runs the chunked one. The result does not
    /// depend on it beyond rounding.
    pub chunk: Option<usize>,
}

impl<'a> MlstmInputs<'a> {
    pub fn new(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor, i: &'a Tensor, f: &'a Tensor) -> MlstmInputs<'a> {
        MlstmInputs { q, k, v, i, f, initial: None, eps: DEFAULT_EPS, chunk: None }
    }
}

/// The validated sizes of an mLSTM pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlstmDims {
    pub batch: usize,
    pub heads: usize,
    pub len: usize,
    pub dqk: usize,
    pub dhv: usize,
    pub dtype: DType,
}

impl MlstmDims {
    pub fn h_shape(&self) -> [usize; 4] {
        [self.batch, self.heads, self.len, self.dhv]
    }
}

/// `h` `(batch, heads, len, dhv)` in the element type and the state after the last step.
#[derive(Clone, Debug)]
pub struct MlstmOutput {
    pub h: Tensor,
    pub final_state: MlstmState,
}

/// Gradients, each shaped and typed as its input; `dinitial` when an initial state was given.
#[derive(Clone, Debug)]
pub struct MlstmGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
    pub di: Tensor,
    pub df: Tensor,
    pub dinitial: Option<MlstmState>,
}

/// eps > 0: the guard `max(|q~ . n|, exp(-m))` is 0 for q = 0 once exp(-m) underflows, and
/// eps = 0 would then divide 0 by 0.
fn check_eps(eps: f32) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::invalid("eps", "a finite value > 0", format!("{eps}")));
    }
    Ok(())
}

impl MlstmInputs<'_> {
    /// Checks every shape, element type and device; returns the sizes.
    pub fn dims(&self) -> Result<MlstmDims> {
        let &[batch, heads, len, dqk] = self.q.shape() else {
            return Err(Error::invalid("q", "shape (batch, heads, len, dqk)", format!("shape {:?}", self.q.shape())));
        };
        let dtype = self.q.dtype();
        let device = self.q.device();
        let dhv = match *self.v.shape() {
            [b, h, l, d] if b == batch && h == heads && l == len => d,
            _ => {
                return Err(Error::invalid(
                    "v",
                    format!("shape (batch {batch}, heads {heads}, len {len}, dhv)"),
                    format!("shape {:?}", self.v.shape()),
                ))
            }
        };
        if dqk == 0 || dhv == 0 {
            return Err(Error::invalid("q, v", "head dimensions dqk, dhv >= 1", format!("dqk {dqk}, dhv {dhv}")));
        }
        self.k.expect_shape("k", self.q.shape())?;
        for (arg, t) in [("k", self.k), ("v", self.v)] {
            t.expect_dtype(arg, dtype)?;
            t.expect_device(arg, &device)?;
        }
        for (arg, t) in [("i", self.i), ("f", self.f)] {
            t.expect_shape(arg, &[batch, heads, len])?;
            t.expect_dtype(arg, DType::F32)?;
            t.expect_device(arg, &device)?;
        }
        if let Some(s) = self.initial {
            s.check(INITIAL, batch, heads, dqk, dhv, &device)?;
        }
        check_eps(self.eps)?;
        if let Some(c) = self.chunk {
            if !cuda::CHUNKS.contains(&c) {
                return Err(Error::invalid("chunk", format!("one of {:?}", cuda::CHUNKS), format!("{c}")));
            }
        }
        // What a pass allocates beyond its inputs: h and the final state (the state can be
        // far larger than q, k and v, e.g. with len 0).
        let bh = batch.checked_mul(heads);
        crate::memory::check_buffers(
            &device,
            &[
                ("v", bh.and_then(|n| n.checked_mul(len)).and_then(|n| n.checked_mul(dhv)), dtype.size_in_bytes()),
                ("q, v", bh.and_then(|n| n.checked_mul(dqk)).and_then(|n| n.checked_mul(dhv.checked_add(1)?)), 4),
            ],
        )?;
        Ok(MlstmDims { batch, heads, len, dqk, dhv, dtype })
    }

    /// The inputs widened to f64 for the reference.
    pub fn to_f64(&self) -> Result<cpu::Mlstm64> {
        let d = self.dims()?;
        Ok(cpu::Mlstm64 {
            heads: d.batch * d.heads,
            len: d.len,
            dqk: d.dqk,
            dhv: d.dhv,
            q: self.q.to_f64_vec()?,
            k: self.k.to_f64_vec()?,
            v: self.v.to_f64_vec()?,
            i: self.i.to_f64_vec()?,
            f: self.f.to_f64_vec()?,
            initial: self.initial.map(MlstmState::to_f64).transpose()?,
            eps: f64::from(self.eps),
        })
    }
}

/// The chunk size and value-column tile the GPU forward picks for `dims` (and the caller's
/// `chunk`, if any) on `dev`, with its shared memory per block.
pub fn forward_tiling(dev: &crate::device::CudaDevice, dims: &MlstmDims, chunk: Option<usize>) -> Result<Tiling> {
    cuda::forward_tiling(dev, dims, chunk)
}

pub use cuda::Tiling;

/// The hidden states of every step and the state after the last one.
pub fn mlstm(inputs: &MlstmInputs) -> Result<MlstmOutput> {
    let dims = inputs.dims()?;
    match inputs.q.device() {
        Device::Cpu => {
            let f = cpu::forward_recurrent(&inputs.to_f64()?);
            Ok(MlstmOutput {
                h: Tensor::from_f64_rounded(&f.h, &dims.h_shape(), dims.dtype)?,
                final_state: MlstmState::from_f64(&f.final_state, dims.batch, dims.heads, dims.dqk, dims.dhv)?,
            })
        }
        Device::Cuda(dev) => cuda::forward(&dev, inputs, &dims),
    }
}

/// A training step's forward ([`mlstm_for_backward`]): the output, and the per-step m,
/// denominator and its pre-guard value `(3, batch * heads * len)` f32 that the backward would
/// otherwise recompute. Only the fused GPU path (bf16 / f16, head dimensions up to 256, chunk
/// unset or 64) records them; elsewhere `stats` is None and the backward recomputes. No state
/// is stored: the backward still recomputes C chunk by chunk.
#[derive(Clone, Debug)]
pub struct MlstmSaved {
    pub output: MlstmOutput,
    stats: Option<Tensor>,
    /// What the stats depend on beyond the shapes, checked against the backward's inputs.
    eps: f32,
    with_initial: bool,
}

impl MlstmSaved {
    /// Whether the backward can skip its recomputation of the forward with these.
    pub fn has_stats(&self) -> bool {
        self.stats.is_some()
    }
}

/// The forward for a training step: [`mlstm`]'s output plus what [`mlstm_backward`] takes as
/// `saved`, so that it need not run the forward again.
pub fn mlstm_for_backward(inputs: &MlstmInputs) -> Result<MlstmSaved> {
    let dims = inputs.dims()?;
    let (eps, with_initial) = (inputs.eps, inputs.initial.is_some());
    match inputs.q.device() {
        Device::Cpu => Ok(MlstmSaved { output: mlstm(inputs)?, stats: None, eps, with_initial }),
        Device::Cuda(dev) => {
            let (output, stats) = cuda::forward_for_backward(&dev, inputs, &dims)?;
            Ok(MlstmSaved { output, stats, eps, with_initial })
        }
    }
}

/// Gradients of `sum(h * dh) + <dfinal.c, C> + <dfinal.n, n> + dfinal.m . m` (`dh` shaped
/// and typed like h, `dfinal` like the state), differentiated as `mode` says. Without
/// `saved` (from [`mlstm_for_backward`] on the same inputs) the forward is recomputed; no
/// state is stored between the passes either way.
pub fn mlstm_backward(
    inputs: &MlstmInputs,
    dh: &Tensor,
    dfinal: Option<&MlstmState>,
    mode: NormalizerGrad,
    saved: Option<&MlstmSaved>,
) -> Result<MlstmGrads> {
    let dims = inputs.dims()?;
    let device = inputs.q.device();
    dh.expect_shape("dh", &dims.h_shape())?;
    dh.expect_dtype("dh", dims.dtype)?;
    dh.expect_device("dh", &device)?;
    if let Some(s) = dfinal {
        s.check(DFINAL, dims.batch, dims.heads, dims.dqk, dims.dhv, &device)?;
    }
    if let Some(s) = saved {
        if s.eps.to_bits() != inputs.eps.to_bits() || s.with_initial != inputs.initial.is_some() {
            return Err(Error::invalid(
                "saved",
                format!("the forward of these inputs (eps {}, initial state {})", inputs.eps, inputs.initial.is_some()),
                format!("eps {}, initial state {}", s.eps, s.with_initial),
            ));
        }
        let h = &s.output.h;
        h.expect_shape("saved.output.h", &dims.h_shape())?;
        h.expect_dtype("saved.output.h", dims.dtype)?;
        h.expect_device("saved.output.h", &device)?;
        s.output.final_state.check(SAVED_FINAL, dims.batch, dims.heads, dims.dqk, dims.dhv, &device)?;
        if let Some(st) = &s.stats {
            st.expect_shape("saved.stats", &[3, dims.batch * dims.heads * dims.len])?;
            st.expect_dtype("saved.stats", DType::F32)?;
            st.expect_device("saved.stats", &device)?;
        }
    }
    match device {
        Device::Cpu => {
            let dfinal = dfinal.map(MlstmState::to_f64).transpose()?;
            let g = cpu::backward(&inputs.to_f64()?, &dh.to_f64_vec()?, dfinal.as_ref(), mode);
            let like = |v: &[f64], t: &Tensor| Tensor::from_f64_rounded(v, t.shape(), t.dtype());
            Ok(MlstmGrads {
                dq: like(&g.dq, inputs.q)?,
                dk: like(&g.dk, inputs.k)?,
                dv: like(&g.dv, inputs.v)?,
                di: like(&g.di, inputs.i)?,
                df: like(&g.df, inputs.f)?,
                dinitial: g
                    .dinitial
                    .map(|s| MlstmState::from_f64(&s, dims.batch, dims.heads, dims.dqk, dims.dhv))
                    .transpose()?,
            })
        }
        Device::Cuda(dev) => {
            let saved = saved.and_then(|s| s.stats.as_ref().map(|st| (&s.output, st)));
            cuda::backward(&dev, inputs, &dims, dh, dfinal, mode, saved)
        }
    }
}

/// One decoding step (mlstm_kernels' `mlstm_recurrent_step`): `q`, `k` `(batch, heads, dqk)`,
/// `v` `(batch, heads, dhv)` in one element type, `i`, `f` `(batch, heads)` f32. Advances
/// `state` in place and returns h `(batch, heads, dhv)`. The state layout is the sequence
/// pass's, so a prefill by [`mlstm`] hands over to decoding directly, and stepping through a
/// sequence reproduces it.
#[allow(clippy::too_many_arguments)]
pub fn mlstm_step(
    state: &mut MlstmState,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    i: &Tensor,
    f: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let &[batch, heads, dqk] = q.shape() else {
        return Err(Error::invalid("q", "shape (batch, heads, dqk)", format!("shape {:?}", q.shape())));
    };
    let dhv = match *v.shape() {
        [b, h, d] if b == batch && h == heads && d > 0 => d,
        _ => {
            return Err(Error::invalid(
                "v",
                format!("shape (batch {batch}, heads {heads}, dhv >= 1)"),
                format!("shape {:?}", v.shape()),
            ))
        }
    };
    if dqk == 0 {
        return Err(Error::invalid("q", "dqk >= 1", "dqk 0"));
    }
    let dtype = q.dtype();
    let device = q.device();
    k.expect_shape("k", q.shape())?;
    for (arg, t) in [("k", k), ("v", v)] {
        t.expect_dtype(arg, dtype)?;
        t.expect_device(arg, &device)?;
    }
    for (arg, t) in [("i", i), ("f", f)] {
        t.expect_shape(arg, &[batch, heads])?;
        t.expect_dtype(arg, DType::F32)?;
        t.expect_device(arg, &device)?;
    }
    state.check(STATE, batch, heads, dqk, dhv, &device)?;
    check_eps(eps)?;
    let dims = MlstmDims { batch, heads, len: 1, dqk, dhv, dtype };
    match device {
        Device::Cpu => {
            let mut s = state.to_f64()?;
            let (q, k, v, i, f) = (q.to_f64_vec()?, k.to_f64_vec()?, v.to_f64_vec()?, i.to_f64_vec()?, f.to_f64_vec()?);
            let mut h = vec![0.0; batch * heads * dhv];
            for hd in 0..batch * heads {
                cpu::step_head(
                    &mut s.c[hd * dqk * dhv..(hd + 1) * dqk * dhv],
                    &mut s.n[hd * dqk..(hd + 1) * dqk],
                    &mut s.m[hd],
                    &q[hd * dqk..(hd + 1) * dqk],
                    &k[hd * dqk..(hd + 1) * dqk],
                    &v[hd * dhv..(hd + 1) * dhv],
                    i[hd],
                    f[hd],
                    f64::from(eps),
                    &mut h[hd * dhv..(hd + 1) * dhv],
                );
            }
            *state = MlstmState::from_f64(&s, batch, heads, dqk, dhv)?;
            Tensor::from_f64_rounded(&h, &[batch, heads, dhv], dtype)
        }
        Device::Cuda(dev) => cuda::step(&dev, state, q, k, v, i, f, eps, &dims),
    }
}
