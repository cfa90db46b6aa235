//! The cross-entropy's `run` command.

use super::{cross_entropy, cross_entropy_fused, CrossEntropyOptions};
use crate::error::{Error, Result};
use crate::ops::registry::{RunArgs, RunCommand, RunOption};
use crate::tensor::Tensor;
use crate::tokens::TokenIds;

/// `--softcap C`: cap the logits at C (C tanh(x / C)) first.
const SOFTCAP: RunOption = RunOption { name: "--softcap", takes_value: true };
/// `--grad`: also write dlogits (the fused pass).
const GRAD: RunOption = RunOption { name: "--grad", takes_value: false };

fn run(a: &RunArgs) -> Result<Vec<(&'static str, Tensor)>> {
    let logits = a.required("logits")?;
    // Targets are stored as a float tensor in the file (safetensors of this CLI hold f32,
    // bf16 and f16); each must be an integer: exact in f32 below 2^24.
    let t = a.required("targets")?;
    let ids = t
        .to_f64_vec()?
        .iter()
        .map(|&v| {
            if v.fract() == 0.0 && v.abs() < 16_777_216.0 {
                Ok(v as i32)
            } else {
                Err(Error::invalid("targets", "integer ids below 2^24 in magnitude", v.to_string()))
            }
        })
        .collect::<Result<Vec<i32>>>()?;
    let targets = TokenIds::new(&ids, t.shape(), a.device)?;
    let softcap = a
        .options
        .get(SOFTCAP.name)
        .map(|s| s.parse::<f32>().map_err(|_| Error::invalid("--softcap", "a number", s.clone())))
        .transpose()?;
    let opts = CrossEntropyOptions { softcap, ..Default::default() };
    if a.flag(GRAD.name) {
        let mut grad = logits.clone();
        let o = cross_entropy_fused(&mut grad, &targets, opts)?;
        Ok(vec![("losses", o.losses), ("totals", o.totals), ("dlogits", grad)])
    } else {
        let o = cross_entropy(logits, &targets, opts)?;
        Ok(vec![("losses", o.losses), ("totals", o.totals)])
    }
}

pub const COMMANDS: &[RunCommand] = &[RunCommand {
    name: "cross_entropy",
    main_input: "logits",
    options: &[SOFTCAP, GRAD],
    usage: "logits (.., vocab), targets (..) integer-valued (-100 ignored) -> losses, totals (mean \
            loss, correct); --grad also dlogits of the mean; --softcap C",
    run,
}];
