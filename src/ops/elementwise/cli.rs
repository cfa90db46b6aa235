//! The elementwise ops' `run` commands.

use super::{activation, activation_backward, add_into, gated, gated_backward, Activation};
use crate::error::Result;
use crate::ops::registry::{RunArgs, RunCommand, RunOption, RunOutputs};

/// `--act NAME`: silu (the default), gelu_tanh or gelu.
const ACT: RunOption = RunOption { name: "--act", takes_value: true };

fn act(a: &RunArgs) -> Result<Activation> {
    a.options.get(ACT.name).map_or(Ok(Activation::Silu), |s| s.parse())
}

pub const COMMANDS: &[RunCommand] = &[
    RunCommand {
        name: "activation",
        main_input: "x",
        options: &[ACT],
        usage: "x -> y = act(x); with dy in the file also dx (--act silu | gelu_tanh | gelu)",
        run: |a| {
            let (x, act) = (a.required("x")?, act(a)?);
            let mut out = vec![("y", activation(x, act)?)];
            if let Some(dy) = a.optional("dy") {
                out.push(("dx", activation_backward(x, dy, act)?));
            }
            Ok(out)
        },
    },
    RunCommand {
        name: "gated",
        main_input: "gate",
        options: &[ACT],
        usage: "gate, up -> y = act(gate) * up; with dy also dgate, dup (SwiGLU with --act silu)",
        run: |a| {
            let (g, u, act) = (a.required("gate")?, a.required("up")?, act(a)?);
            let mut out: RunOutputs = vec![("y", gated(g, u, act)?)];
            if let Some(dy) = a.optional("dy") {
                let gg = gated_backward(g, u, dy, act)?;
                out.extend([("dgate", gg.dgate), ("dup", gg.dup)]);
            }
            Ok(out)
        },
    },
    RunCommand {
        name: "add_into",
        main_input: "dst",
        options: &[],
        usage: "dst, src -> dst + src (in dst's type)",
        run: |a| {
            let mut dst = a.required("dst")?.clone();
            add_into(&mut dst, a.required("src")?)?;
            Ok(vec![("dst", dst)])
        },
    },
];
