//! AdamW's `run` command: one step on a single parameter.

use super::{adamw_step, zero_state, AdamWConfig, AdamWParam, ParamGroup};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::registry::{RunArgs, RunCommand, RunOption};
use crate::tensor::Tensor;

const LR: RunOption = RunOption { name: "--lr", takes_value: true };
const WEIGHT_DECAY: RunOption = RunOption { name: "--weight-decay", takes_value: true };
const MAX_NORM: RunOption = RunOption { name: "--max-grad-norm", takes_value: true };

fn float(a: &RunArgs, o: RunOption, default: Option<f32>) -> Result<Option<f32>> {
    match a.options.get(o.name) {
        Some(s) => s.parse().map(Some).map_err(|_| Error::invalid(o.name, "a number", s.clone())),
        None => Ok(default),
    }
}

pub const COMMANDS: &[RunCommand] = &[RunCommand {
    name: "adamw",
    main_input: "param",
    options: &[LR, WEIGHT_DECAY, MAX_NORM],
    usage: "param, grad (f32), optional m, v (zeros otherwise) -> param, m, v, param_bf16 after step 1 \
            (--lr 1e-3, --weight-decay 0.01, --max-grad-norm N)",
    run: |a| {
        let mut param = a.required("param")?.clone();
        let mut grad = a.required("grad")?.clone();
        let (m0, v0) = zero_state(&param)?;
        let mut m = a.optional("m").cloned().unwrap_or(m0);
        let mut v = a.optional("v").cloned().unwrap_or(v0);
        let mut copy = Tensor::full(0.0, param.shape(), DType::BF16, a.device)?;
        let group = ParamGroup {
            lr: float(a, LR, Some(1e-3))?.unwrap_or(1e-3),
            weight_decay: float(a, WEIGHT_DECAY, Some(0.01))?.unwrap_or(0.01),
        };
        let config = AdamWConfig { max_grad_norm: float(a, MAX_NORM, None)?, ..Default::default() };
        let mut params =
            [AdamWParam { param: &mut param, grad: &mut grad, m: &mut m, v: &mut v, copy: Some(&mut copy), group: 0 }];
        adamw_step(&config, 1, &[group], &mut params)?;
        Ok(vec![("param", param), ("m", m), ("v", v), ("param_bf16", copy)])
    },
}];
