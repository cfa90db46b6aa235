//! The causal depthwise conv1d in front of Mamba's selective scan, with the semantics of the
//! causal-conv1d package (`causal_conv1d_fn`, `causal_conv1d_update`; the math is in
//! [`cpu`]):
//!
//! - `x`, `out`: `(batch, dim, len)`, element type f32, bf16 or f16;
//! - `weight`: `(dim, width)` f32 with width 2..=4; `bias`: `(dim)` f32; optional SiLU;
//! - conv states (`initial_state`, the returned `final_state`, the decoding state): the
//!   inputs themselves, so they keep the element type: `(batch, dim, width - 1)`.
//!
//! Beyond the package: packed batches through the scan's [`SequenceResets`] (an output never
//! sees inputs of an earlier sequence), and a deterministic backward (fixed-order sums, no
//! float atomics). Arithmetic is f32 on the GPU; each output is rounded once. Non-finite
//! inputs propagate as the arithmetic does.

pub mod bench;
pub mod check;
pub(crate) mod cli;
pub mod cpu;
mod cuda;

/// The causal conv1d in the CLI's `check`, `bench conv` and `run`.
pub const ENTRY: crate::ops::registry::OpEntry = crate::ops::registry::OpEntry {
    name: "causal_conv1d",
    bench_group: "conv",
    check: check::check_rows,
    bench: bench::bench_rows,
    run: cli::COMMANDS,
};

pub use super::sequence_resets::SequenceResets;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Kernel widths the package supports, and so do we.
pub const MIN_WIDTH: usize = 2;
pub const MAX_WIDTH: usize = 4;

/// The inputs of one causal conv1d. Build with [`ConvInputs::new`] and set the options.
#[derive(Clone, Copy, Debug)]
pub struct ConvInputs<'a> {
    pub x: &'a Tensor,
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    /// The `width - 1` inputs before `x[0]` (the causal-conv1d package's `initial_states`);
    /// zeros when absent.
    pub initial_state: Option<&'a Tensor>,
    pub resets: Option<&'a SequenceResets>,
    /// `out = SiLU(conv + bias)` (the package's `activation="silu"`).
    pub silu: bool,
}

impl<'a> ConvInputs<'a> {
    /// No bias, initial state, resets or activation.
    pub fn new(x: &'a Tensor, weight: &'a Tensor) -> ConvInputs<'a> {
        ConvInputs { x, weight, bias: None, initial_state: None, resets: None, silu: false }
    }
}

/// The validated sizes of a conv1d.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    pub width: usize,
    pub dtype: DType,
}

impl ConvDims {
    /// `(batch, dim, width - 1)`: the initial and final state.
    pub fn state_shape(&self) -> [usize; 3] {
        [self.batch, self.dim, self.width - 1]
    }
}

/// `out` `(batch, dim, len)` and the last `width - 1` inputs `(batch, dim, width - 1)` in the
/// element type (what decoding continues from; zeros where a packed row's last sequence
/// could not see, or where the sequence is shorter than the state).
#[derive(Clone, Debug)]
pub struct ConvOutput {
    pub out: Tensor,
    pub final_state: Tensor,
}

/// Gradients of `sum(out * dout) + sum(final_state * dfinal_state)`, each shaped and typed as
/// its input.
#[derive(Clone, Debug)]
pub struct ConvGrads {
    pub dx: Tensor,
    pub dweight: Tensor,
    pub dbias: Option<Tensor>,
    pub dinitial_state: Option<Tensor>,
}

/// `weight`: `(dim, width)` f32, width in MIN_WIDTH..=MAX_WIDTH; returns width.
fn conv_width(weight: &Tensor, dim: usize) -> Result<usize> {
    match *weight.shape() {
        [d, w] if d == dim && (MIN_WIDTH..=MAX_WIDTH).contains(&w) => {
            weight.expect_dtype("weight", DType::F32)?;
            Ok(w)
        }
        _ => Err(Error::invalid(
            "weight",
            format!("shape (dim {dim}, width in {MIN_WIDTH}..={MAX_WIDTH})"),
            format!("shape {:?}", weight.shape()),
        )),
    }
}

fn check_bias(bias: Option<&Tensor>, dim: usize, device: &Device) -> Result<()> {
    if let Some(b) = bias {
        b.expect_shape("bias", &[dim])?;
        b.expect_dtype("bias", DType::F32)?;
        b.expect_device("bias", device)?;
    }
    Ok(())
}

impl ConvInputs<'_> {
    /// Checks every shape, element type and device; returns the sizes.
    pub fn dims(&self) -> Result<ConvDims> {
        let &[batch, dim, len] = self.x.shape() else {
            return Err(Error::invalid("x", "shape (batch, dim, len)", format!("shape {:?}", self.x.shape())));
        };
        let dtype = self.x.dtype();
        let device = self.x.device();
        let width = conv_width(self.weight, dim)?;
        self.weight.expect_device("weight", &device)?;
        check_bias(self.bias, dim, &device)?;
        let dims = ConvDims { batch, dim, len, width, dtype };
        if let Some(h) = self.initial_state {
            h.expect_shape("initial_state", &dims.state_shape())?;
            h.expect_dtype("initial_state", dtype)?;
            h.expect_device("initial_state", &device)?;
        }
        if let Some(r) = self.resets {
            r.expect_size(batch, len)?;
        }
        // The output and the final state (which x with len 0 does not bound).
        let rows = batch.checked_mul(dim);
        crate::memory::check_buffers(
            &device,
            &[
                ("x", rows.and_then(|r| r.checked_mul(len)), dtype.size_in_bytes()),
                ("x", rows.and_then(|r| r.checked_mul(width - 1)), dtype.size_in_bytes()),
            ],
        )?;
        Ok(dims)
    }

    /// The inputs widened to f64 for the reference.
    pub fn to_f64(&self) -> Result<cpu::Conv64> {
        let dims = self.dims()?;
        let opt = |t: Option<&Tensor>| t.map(Tensor::to_f64_vec).transpose();
        Ok(cpu::Conv64 {
            batch: dims.batch,
            dim: dims.dim,
            len: dims.len,
            width: dims.width,
            x: self.x.to_f64_vec()?,
            weight: self.weight.to_f64_vec()?,
            bias: opt(self.bias)?,
            initial_state: opt(self.initial_state)?,
            resets: self.resets.map(|r| r.flags().to_vec()),
            silu: self.silu,
        })
    }
}

/// The causal conv1d's output and final state.
pub fn causal_conv1d(inputs: &ConvInputs) -> Result<ConvOutput> {
    let dims = inputs.dims()?;
    match inputs.x.device() {
        Device::Cpu => {
            let f = cpu::forward(&inputs.to_f64()?);
            Ok(ConvOutput {
                out: Tensor::from_f64_rounded(&f.out, inputs.x.shape(), dims.dtype)?,
                final_state: Tensor::from_f64_rounded(&f.final_state, &dims.state_shape(), dims.dtype)?,
            })
        }
        Device::Cuda(dev) => cuda::forward(&dev, inputs, &dims),
    }
}

/// Gradients of `sum(out * dout) + sum(final_state * dfinal_state)`: `dout` shaped and typed
/// like `x`, `dfinal_state` like the final state. The forward is recomputed, nothing stored.
pub fn causal_conv1d_backward(inputs: &ConvInputs, dout: &Tensor, dfinal_state: Option<&Tensor>) -> Result<ConvGrads> {
    let dims = inputs.dims()?;
    let device = inputs.x.device();
    dout.expect_shape("dout", inputs.x.shape())?;
    dout.expect_dtype("dout", dims.dtype)?;
    dout.expect_device("dout", &device)?;
    if let Some(t) = dfinal_state {
        t.expect_shape("dfinal_state", &dims.state_shape())?;
        t.expect_dtype("dfinal_state", dims.dtype)?;
        t.expect_device("dfinal_state", &device)?;
    }
    match device {
        Device::Cpu => {
            let dfinal = dfinal_state.map(Tensor::to_f64_vec).transpose()?;
            let g = cpu::backward(&inputs.to_f64()?, &dout.to_f64_vec()?, dfinal.as_deref());
            let like = |v: &[f64], t: &Tensor| Tensor::from_f64_rounded(v, t.shape(), t.dtype());
            Ok(ConvGrads {
                dx: like(&g.dx, inputs.x)?,
                dweight: like(&g.dweight, inputs.weight)?,
                dbias: g.dbias.zip(inputs.bias).map(|(v, t)| like(&v, t)).transpose()?,
                dinitial_state: g.dinitial_state.zip(inputs.initial_state).map(|(v, t)| like(&v, t)).transpose()?,
            })
        }
        Device::Cuda(dev) => cuda::backward(&dev, inputs, &dims, dout, dfinal_state),
    }
}

/// The sizes of a rolling-state update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct UpdateDims {
    batch: usize,
    dim: usize,
    width: usize,
    state_len: usize,
    tokens: usize,
    dtype: DType,
}

fn update_dims(state: &Tensor, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<UpdateDims> {
    let (batch, dim, tokens) = match *x.shape() {
        [b, d] => (b, d, 1),
        [b, d, t] => (b, d, t),
        _ => {
            return Err(Error::invalid(
                "x",
                "shape (batch, dim) or (batch, dim, tokens)",
                format!("shape {:?}", x.shape()),
            ))
        }
    };
    let dtype = x.dtype();
    let device = x.device();
    let width = conv_width(weight, dim)?;
    weight.expect_device("weight", &device)?;
    check_bias(bias, dim, &device)?;
    let state_len = match *state.shape() {
        [b, d, s] if b == batch && d == dim && s >= width - 1 => s,
        _ => {
            return Err(Error::invalid(
                "state",
                format!("shape (batch {batch}, dim {dim}, state_len >= width - 1 = {})", width - 1),
                format!("shape {:?}", state.shape()),
            ))
        }
    };
    state.expect_dtype("state", dtype)?;
    state.expect_device("state", &device)?;
    // The output is x's size; the rows' product must fit (x and state may both be empty).
    let rows = batch.checked_mul(dim);
    crate::memory::check_buffers(&device, &[("x", rows.and_then(|r| r.checked_mul(tokens)), dtype.size_in_bytes())])?;
    Ok(UpdateDims { batch, dim, width, state_len, tokens, dtype })
}

/// The decoding step (the package's `causal_conv1d_update`): `x` `(batch, dim)` (one token)
/// or `(batch, dim, tokens)`, `state` `(batch, dim, state_len)` in x's element type with
/// `state_len >= width - 1`, updated in place to the last `state_len` values of `[state, x]`.
/// Returns the outputs, shaped like `x`. A [`causal_conv1d`] final state (`state_len = width
/// - 1`) hands over to decoding directly, and stepping reproduces the conv.
pub fn causal_conv1d_update(
    state: &mut Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<Tensor> {
    let dims = update_dims(state, x, weight, bias)?;
    match x.device() {
        Device::Cpu => {
            let p = cpu::Update64 {
                rows: dims.batch * dims.dim,
                dim: dims.dim,
                width: dims.width,
                state_len: dims.state_len,
                tokens: dims.tokens,
                state: state.to_f64_vec()?,
                x: x.to_f64_vec()?,
                weight: weight.to_f64_vec()?,
                bias: bias.map(Tensor::to_f64_vec).transpose()?,
                silu,
            };
            let (out, new_state) = cpu::update(&p);
            *state = Tensor::from_f64_rounded(&new_state, state.shape(), dims.dtype)?;
            Tensor::from_f64_rounded(&out, x.shape(), dims.dtype)
        }
        Device::Cuda(dev) => cuda::update(&dev, state, x, weight, bias, silu, &dims),
    }
}
