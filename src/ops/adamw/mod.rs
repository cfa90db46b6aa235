//! AdamW over a model's parameters in one fused multi-tensor launch: PyTorch's
//! `torch.optim.AdamW` (decoupled weight decay, bias correction, per-group learning rate and
//! weight decay) with `torch.nn.utils.clip_grad_norm_` in front (global L2 norm over every
//! gradient, `clip = min(1, max_norm / (norm + 1e-6))`), and in the same pass the model's
//! bf16/f16 copy of each f32 master weight and, when asked, the gradient zeroed for the next
//! step. Per element, with `bc_i = 1 - beta_i^step`:
//!
//! `p *= 1 - lr wd`; `m = b1 m + (1 - b1) g`; `v = b2 v + (1 - b2) g^2`;
//! `p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)`.
//!
//! Parameters, gradients and the moments are f32 (master weights); the copy is f32, bf16 or
//! f16. The gradient norm is summed in a fixed order (deterministic) and read by the update on
//! the device: a step never waits for the host.

pub mod bench;
pub mod check;
pub(crate) mod cli;
pub mod cpu;
mod cuda;

/// AdamW in the CLI's `check`, `bench adamw` and `run`.
pub const ENTRY: crate::ops::registry::OpEntry = crate::ops::registry::OpEntry {
    name: "adamw",
    bench_group: "adamw",
    check: check::check_rows,
    bench: bench::bench_rows,
    run: cli::COMMANDS,
};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The optimizer's constants (PyTorch's defaults: betas 0.9, 0.999, eps 1e-8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Clip the global gradient norm to this (None: no clipping, and no norm computed).
    pub max_grad_norm: Option<f32>,
    /// Zero every gradient after its use.
    pub zero_grad: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, max_grad_norm: None, zero_grad: false }
    }
}

/// A parameter group's learning rate and weight decay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamGroup {
    pub lr: f32,
    pub weight_decay: f32,
}

/// One parameter and its state, all `f32` of one shape; `copy` (the model's weights in their
/// compute type) of the same shape in any type.
#[derive(Debug)]
pub struct AdamWParam<'a> {
    pub param: &'a mut Tensor,
    pub grad: &'a mut Tensor,
    pub m: &'a mut Tensor,
    pub v: &'a mut Tensor,
    pub copy: Option<&'a mut Tensor>,
    /// Index into the step's groups.
    pub group: usize,
}

/// What a step reports: the global gradient norm before clipping (`[1]` f32 on the device),
/// when clipping asked for it.
#[derive(Clone, Debug)]
pub struct AdamWStep {
    pub grad_norm: Option<Tensor>,
}

/// Whether a parameter is conventionally left out of weight decay: vectors (norm weights,
/// biases, D) and Mamba's `A_log` (marked `_no_weight_decay` in mamba_ssm).
pub fn no_weight_decay(name: &str, rank: usize) -> bool {
    rank < 2 || name.ends_with("A_log") || name == "D" || name.ends_with(".D")
}

fn check_config(c: &AdamWConfig, step: u64, groups: &[ParamGroup]) -> Result<()> {
    for (arg, b) in [("beta1", c.beta1), ("beta2", c.beta2)] {
        if !(0.0..1.0).contains(&b) {
            return Err(Error::invalid(arg, "a value in [0, 1)", b.to_string()));
        }
    }
    if !(c.eps.is_finite() && c.eps > 0.0) {
        return Err(Error::invalid("eps", "a finite value > 0", c.eps.to_string()));
    }
    if let Some(n) = c.max_grad_norm {
        if !(n.is_finite() && n > 0.0) {
            return Err(Error::invalid("max_grad_norm", "a finite value > 0", n.to_string()));
        }
    }
    if step == 0 {
        return Err(Error::invalid("step", "the 1-based step count (>= 1)", "0"));
    }
    for g in groups {
        if !(g.lr.is_finite() && g.lr >= 0.0 && g.weight_decay.is_finite() && g.weight_decay >= 0.0) {
            return Err(Error::invalid("groups", "finite lr and weight decay >= 0", format!("{g:?}")));
        }
    }
    Ok(())
}

fn check_params(params: &[AdamWParam], groups: &[ParamGroup]) -> Result<Device> {
    let Some(first) = params.first() else { return Ok(Device::Cpu) };
    let device = first.param.device();
    for p in params {
        let shape = p.param.shape();
        p.param.expect_dtype("param", DType::F32)?;
        p.param.expect_device("param", &device)?;
        for (arg, t) in [("grad", &*p.grad), ("m", &*p.m), ("v", &*p.v)] {
            t.expect_shape(arg, shape)?;
            t.expect_dtype(arg, DType::F32)?;
            t.expect_device(arg, &device)?;
        }
        if let Some(c) = &p.copy {
            c.expect_shape("copy", shape)?;
            c.expect_device("copy", &device)?;
        }
        if p.group >= groups.len() {
            return Err(Error::invalid(
                "group",
                format!("an index below {} (the groups given)", groups.len()),
                p.group.to_string(),
            ));
        }
    }
    Ok(device)
}

/// One AdamW step (`step`: 1 for the first) over `params`.
pub fn adamw_step(
    config: &AdamWConfig,
    step: u64,
    groups: &[ParamGroup],
    params: &mut [AdamWParam],
) -> Result<AdamWStep> {
    check_config(config, step, groups)?;
    let device = check_params(params, groups)?;
    if params.is_empty() {
        return Ok(AdamWStep { grad_norm: None });
    }
    match device {
        Device::Cpu => cpu::step(config, step, groups, params),
        Device::Cuda(dev) => cuda::step(&dev, config, step, groups, params),
    }
}

/// Zeroed moments `(m, v)` for `param`, on its device.
pub fn zero_state(param: &Tensor) -> Result<(Tensor, Tensor)> {
    let d = param.device();
    Ok((Tensor::full(0.0, param.shape(), DType::F32, &d)?, Tensor::full(0.0, param.shape(), DType::F32, &d)?))
}
