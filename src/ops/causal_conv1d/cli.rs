//! The causal conv1d's `run` commands.

use crate::error::Result;
use crate::ops::causal_conv1d::{causal_conv1d, causal_conv1d_backward, causal_conv1d_update, ConvInputs};
use crate::ops::registry::{RunArgs, RunCommand, RunOption, RunOutputs};

/// `--silu`: SiLU applied to the output.
const SILU: RunOption = RunOption { name: "--silu", takes_value: false };

fn inputs<'a>(a: &'a RunArgs) -> Result<ConvInputs<'a>> {
    Ok(ConvInputs {
        bias: a.optional("bias"),
        initial_state: a.optional("initial_state"),
        silu: a.flag(SILU.name),
        ..ConvInputs::new(a.required("x")?, a.required("weight")?)
    })
}

fn forward(a: &RunArgs) -> Result<RunOutputs> {
    let o = causal_conv1d(&inputs(a)?)?;
    Ok(vec![("out", o.out), ("final_state", o.final_state)])
}

fn backward(a: &RunArgs) -> Result<RunOutputs> {
    let g = causal_conv1d_backward(&inputs(a)?, a.required("dout")?, a.optional("dfinal_state"))?;
    let mut v = vec![("dx", g.dx), ("dweight", g.dweight)];
    v.extend(g.dbias.map(|t| ("dbias", t)));
    v.extend(g.dinitial_state.map(|t| ("dinitial_state", t)));
    Ok(v)
}

fn update(a: &RunArgs) -> Result<RunOutputs> {
    let mut state = a.required("state")?.clone();
    let out = causal_conv1d_update(
        &mut state,
        a.required("x")?,
        a.required("weight")?,
        a.optional("bias"),
        a.flag(SILU.name),
    )?;
    Ok(vec![("out", out), ("state", state)])
}

pub const COMMANDS: &[RunCommand] = &[
    RunCommand {
        name: "causal_conv1d",
        main_input: "x",
        options: &[SILU],
        usage: "x (B, D, L), weight (D, W) f32 (W 2..4) and optionally bias (D) f32, \
                initial_state (B, D, W-1) -> out, final_state",
        run: forward,
    },
    RunCommand {
        name: "causal_conv1d_backward",
        main_input: "x",
        options: &[SILU],
        usage: "the same and dout[, dfinal_state] -> dx, dweight[, dbias, dinitial_state]",
        run: backward,
    },
    RunCommand {
        name: "causal_conv1d_update",
        main_input: "x",
        options: &[SILU],
        usage: "x (B, D[, T]), weight[, bias] and state (B, D, S >= W-1) -> out, state",
        run: update,
    },
];
