//! The cross-entropy's `run` command.

use super::{cross_entropy, cross_entropy_fused, CrossEntropyOptions};
use crate::error::{Error, Result};
use crate::ops::registry::{RunArgs, RunCommand, RunOption};
use crate::tensor::Tensor;

/// `--softcap C`: cap the logits at C (C tanh(x / C)) first.
const SOFTCAP: RunOption = RunOption { name: "--softcap", takes_value: true };
/// `--grad`: also write dlogits (the fused pass).
const GRAD: RunOption = RunOption { name: "--grad", takes_value: false };

fn run(a: &RunArgs) -> Result<Vec<(&'static str, Tensor)>> {
    let logits = a.required("logits")?;
    let targets = crate::ops::embedding::cli::ids_from(a, "targets")?;
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
