//! The selective scan's `run` commands.

use crate::error::Result;
use crate::ops::registry::{RunArgs, RunCommand, RunOption, RunOutputs};
use crate::ops::selective_scan::{selective_scan, selective_scan_backward, ScanInputs};

/// `--softplus`: softplus applied to delta + delta_bias.
const SOFTPLUS: RunOption = RunOption { name: "--softplus", takes_value: false };

fn inputs<'a>(a: &'a RunArgs) -> Result<ScanInputs<'a>> {
    Ok(ScanInputs {
        d: a.optional("D"),
        z: a.optional("z"),
        delta_bias: a.optional("delta_bias"),
        delta_softplus: a.flag(SOFTPLUS.name),
        h0: a.optional("h0"),
        ..ScanInputs::new(a.required("u")?, a.required("delta")?, a.required("A")?, a.required("B")?, a.required("C")?)
    })
}

fn forward(a: &RunArgs) -> Result<RunOutputs> {
    let o = selective_scan(&inputs(a)?)?;
    Ok(vec![("out", o.out), ("last_state", o.last_state)])
}

fn backward(a: &RunArgs) -> Result<RunOutputs> {
    let g = selective_scan_backward(&inputs(a)?, a.required("dout")?, a.optional("dlast_state"), None)?;
    let mut v = vec![("du", g.du), ("ddelta", g.ddelta), ("dA", g.da), ("dB", g.db), ("dC", g.dc)];
    v.extend(g.dd.map(|t| ("dD", t)));
    v.extend(g.dz.map(|t| ("dz", t)));
    v.extend(g.ddelta_bias.map(|t| ("ddelta_bias", t)));
    v.extend(g.dh0.map(|t| ("dh0", t)));
    Ok(v)
}

pub const COMMANDS: &[RunCommand] = &[
    RunCommand {
        name: "selective_scan",
        main_input: "u",
        options: &[SOFTPLUS],
        usage: "u, delta (B, D, L), A (D, N) f32, B, C ((B, G, N, L) or (D, N) f32) and optionally \
                D, delta_bias (D) f32, z (B, D, L), h0 (B, D, N) f32 -> out, last_state",
        run: forward,
    },
    RunCommand {
        name: "selective_scan_backward",
        main_input: "u",
        options: &[SOFTPLUS],
        usage: "the same and dout[, dlast_state] -> du, ddelta, dA, dB, dC[, dD, dz, ddelta_bias, dh0]",
        run: backward,
    },
];
