//! The B-spline activation's `run` commands.

use crate::error::Result;
use crate::ops::bspline::cli::{grid, ORDER};
use crate::ops::registry::{RunArgs, RunCommand, RunOutputs};
use crate::ops::spline_activation::SplineActivation;

/// The activation of a run's input file: `grid`, `coeff` and, with the SiLU term, `base_weight`.
fn activation(a: &RunArgs) -> Result<SplineActivation> {
    SplineActivation::from_parameters(grid(a)?, a.required("coeff")?.clone(), a.optional("base_weight").cloned())
}

fn backward(a: &RunArgs) -> Result<RunOutputs> {
    let g = activation(a)?.backward(a.required("x")?, a.required("dy")?)?;
    let mut v = vec![("dx", g.dx), ("d_coeff", g.coeff)];
    v.extend(g.base_weight.map(|t| ("d_base_weight", t)));
    Ok(v)
}

pub const COMMANDS: &[RunCommand] = &[
    RunCommand {
        name: "spline_activation",
        main_input: "x",
        options: &[ORDER],
        usage: "x (.., channels), grid (channels, n_knots) f32, coeff[, base_weight] -> y",
        run: |a| Ok(vec![("y", activation(a)?.forward(a.required("x")?)?)]),
    },
    RunCommand {
        name: "spline_activation_backward",
        main_input: "x",
        options: &[ORDER],
        usage: "the same and dy -> dx, d_coeff[, d_base_weight]",
        run: backward,
    },
];
