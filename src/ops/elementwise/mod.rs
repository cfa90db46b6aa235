//! Elementwise ops of the model layer, forward and backward: the activations SiLU and GELU
//! (tanh approximation and exact erf), the gated products SwiGLU / GeGLU (`act(gate) * up`,
//! which is also Mamba's output gate `y * SiLU(z)`), and the in-place add of a block's output
//! into the residual stream.
//!
//! Semantics are PyTorch's `torch.nn.functional.silu` and `gelu(approximate="tanh" | "none")`,
//! applied in f32 (f64 on the CPU) and rounded once to the element type. Tensors of any shape;
//! the gated inputs and gradients share one shape and type. Every kernel reads and writes
//! 16-byte vectors (any length: the remainder element by element).

pub mod bench;
pub mod check;
pub(crate) mod cli;
pub mod cpu;
mod cuda;

/// The elementwise ops in the CLI's `check`, `bench elementwise` and `run`.
pub const ENTRY: crate::ops::registry::OpEntry = crate::ops::registry::OpEntry {
    name: "elementwise",
    bench_group: "elementwise",
    check: check::check_rows,
    bench: bench::bench_rows,
    run: cli::COMMANDS,
};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// An activation function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)`.
    Silu,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (GPT-2's, `approximate="tanh"`).
    GeluTanh,
    /// `0.5 x (1 + erf(x / sqrt 2))` (`approximate="none"`).
    GeluErf,
}

impl Activation {
    pub const ALL: [Activation; 3] = [Activation::Silu, Activation::GeluTanh, Activation::GeluErf];

    /// The name `run --act` takes and bench rows show.
    pub fn as_str(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_tanh",
            Activation::GeluErf => "gelu",
        }
    }

    /// `hk_ew::Act` in cuda/elementwise.cu.
    fn code(self) -> u32 {
        match self {
            Activation::Silu => 0,
            Activation::GeluTanh => 1,
            Activation::GeluErf => 2,
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = Error;

    fn from_str(s: &str) -> Result<Activation> {
        Activation::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| Error::invalid("act", "one of silu, gelu_tanh, gelu", s))
    }
}

/// The gradients of `sum(dy * act(gate) * up)`.
#[derive(Clone, Debug)]
pub struct GatedGrads {
    pub dgate: Tensor,
    pub dup: Tensor,
}

/// Checks that `t` has `like`'s shape, type and device.
fn expect_like(arg: &'static str, t: &Tensor, like: &Tensor) -> Result<()> {
    t.expect_shape(arg, like.shape())?;
    t.expect_dtype(arg, like.dtype())?;
    t.expect_device(arg, &like.device())
}

/// Checks that `outputs` tensors like `x` can exist next to it.
fn check_outputs(x: &Tensor, outputs: usize) -> Result<()> {
    let n = x.elem_count();
    let es = x.dtype().size_in_bytes();
    let bufs: Vec<crate::memory::Buffer> = (0..outputs).map(|_| ("x", Some(n), es)).collect();
    crate::memory::check_buffers(&x.device(), &bufs)
}

/// `act(x)`, elementwise.
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    check_outputs(x, 1)?;
    match x.device() {
        Device::Cpu => {
            let y: Vec<f64> = x.to_f64_vec()?.into_iter().map(|v| cpu::act(act, v)).collect();
            Tensor::from_f64_rounded(&y, x.shape(), x.dtype())
        }
        Device::Cuda(dev) => cuda::activation(&dev, x, act),
    }
}

/// `dy * act'(x)`: the gradient of `sum(dy * act(x))` with respect to x.
pub fn activation_backward(x: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor> {
    expect_like("dy", dy, x)?;
    check_outputs(x, 1)?;
    match x.device() {
        Device::Cpu => {
            let dx: Vec<f64> =
                x.to_f64_vec()?.into_iter().zip(dy.to_f64_vec()?).map(|(v, d)| d * cpu::act_grad(act, v)).collect();
            Tensor::from_f64_rounded(&dx, x.shape(), x.dtype())
        }
        Device::Cuda(dev) => cuda::activation_backward(&dev, x, dy, act),
    }
}

/// `act(gate) * up`, elementwise: SwiGLU with [`Activation::Silu`], GeGLU with a GELU, and
/// Mamba's gated output `y * SiLU(z)` with `gate = z`, `up = y`.
pub fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    expect_like("up", up, gate)?;
    check_outputs(gate, 1)?;
    match gate.device() {
        Device::Cpu => {
            let y: Vec<f64> =
                gate.to_f64_vec()?.into_iter().zip(up.to_f64_vec()?).map(|(g, u)| cpu::act(act, g) * u).collect();
            Tensor::from_f64_rounded(&y, gate.shape(), gate.dtype())
        }
        Device::Cuda(dev) => cuda::gated(&dev, gate, up, act),
    }
}

/// The gradients of `sum(dy * act(gate) * up)`: `dgate = dy * up * act'(gate)`,
/// `dup = dy * act(gate)`.
pub fn gated_backward(gate: &Tensor, up: &Tensor, dy: &Tensor, act: Activation) -> Result<GatedGrads> {
    expect_like("up", up, gate)?;
    expect_like("dy", dy, gate)?;
    check_outputs(gate, 2)?;
    match gate.device() {
        Device::Cpu => {
            let (g, u, d) = (gate.to_f64_vec()?, up.to_f64_vec()?, dy.to_f64_vec()?);
            let (dg, du) = cpu::gated_backward(&g, &u, &d, act);
            Ok(GatedGrads {
                dgate: Tensor::from_f64_rounded(&dg, gate.shape(), gate.dtype())?,
                dup: Tensor::from_f64_rounded(&du, gate.shape(), gate.dtype())?,
            })
        }
        Device::Cuda(dev) => cuda::gated_backward(&dev, gate, up, dy, act),
    }
}

/// `dst += src` in place, in f32 arithmetic rounded to dst's type: the residual stream plus a
/// block's output, or a gradient accumulated over uses. `src` has dst's shape and its type, or
/// a 16-bit type when dst is f32 (the f32 residual stream plus a bf16 or f16 output).
pub fn add_into(dst: &mut Tensor, src: &Tensor) -> Result<()> {
    src.expect_shape("src", dst.shape())?;
    src.expect_device("src", &dst.device())?;
    if src.dtype() != dst.dtype() && dst.dtype() != DType::F32 {
        return Err(Error::DTypeMismatch {
            arg: "src",
            expected: format!("{} (dst's type; any type when dst is f32)", dst.dtype()),
            found: src.dtype().to_string(),
        });
    }
    match dst.device() {
        Device::Cpu => {
            let sum: Vec<f64> = dst.to_f64_vec()?.into_iter().zip(src.to_f64_vec()?).map(|(a, b)| a + b).collect();
            *dst = Tensor::from_f64_rounded(&sum, dst.shape(), dst.dtype())?;
            Ok(())
        }
        Device::Cuda(dev) => cuda::add_into(&dev, dst, src),
    }
}
