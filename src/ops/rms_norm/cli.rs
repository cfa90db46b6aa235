//! RMSNorm's `run` commands.

use crate::error::Result;
use crate::ops::registry::{RunArgs, RunCommand, RunOutputs};
use crate::ops::rms_norm::{rms_norm, rms_norm_backward, DEFAULT_EPS};

fn backward(a: &RunArgs) -> Result<RunOutputs> {
    let (x, w) = (a.required("x")?, a.required("weight")?);
    let rstd = rms_norm(x, w, DEFAULT_EPS)?.rstd;
    let g = rms_norm_backward(x, w, &rstd, a.required("dy")?)?;
    Ok(vec![("dx", g.dx), ("dweight", g.dweight)])
}

pub const COMMANDS: &[RunCommand] = &[
    RunCommand {
        name: "rms_norm",
        main_input: "x",
        options: &[],
        usage: "x (.., dim), weight (dim) f32 -> y, rstd (eps 1e-5)",
        run: |a| {
            let o = rms_norm(a.required("x")?, a.required("weight")?, DEFAULT_EPS)?;
            Ok(vec![("y", o.y), ("rstd", o.rstd)])
        },
    },
    RunCommand {
        name: "rms_norm_backward",
        main_input: "x",
        options: &[],
        usage: "the same and dy -> dx, dweight",
        run: backward,
    },
];
