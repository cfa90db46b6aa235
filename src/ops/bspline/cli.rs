//! The B-spline ops' `run` commands.

use crate::error::Result;
use crate::ops::bspline::{self, KnotGrid};
use crate::ops::registry::{RunArgs, RunCommand, RunOption};

/// `--order K`: the spline order of the knot grid in the input file (default 3).
pub const ORDER: RunOption = RunOption { name: "--order", takes_value: true };

/// The spline order a run asked for, 3 by default.
pub fn order(args: &RunArgs) -> Result<usize> {
    Ok(args.number(ORDER.name)?.unwrap_or(3))
}

/// The knot grid of a run's input file (`grid`, (in, n_knots) f32) at the run's order.
pub fn grid(args: &RunArgs) -> Result<KnotGrid> {
    KnotGrid::from_knots(args.required("grid")?, order(args)?)
}

pub const COMMANDS: &[RunCommand] = &[
    RunCommand {
        name: "bspline_basis",
        main_input: "x",
        options: &[ORDER],
        usage: "x (.., in), grid (in, n_knots) f32 -> out",
        run: |a| Ok(vec![("out", bspline::bspline_basis(a.required("x")?, &grid(a)?)?)]),
    },
    RunCommand {
        name: "bspline_basis_derivative",
        main_input: "x",
        options: &[ORDER],
        usage: "x (.., in), grid (in, n_knots) f32 -> out",
        run: |a| Ok(vec![("out", bspline::bspline_basis_derivative(a.required("x")?, &grid(a)?)?)]),
    },
];
