//! KANLinear's `run` commands.

use crate::error::{Error, Result};
use crate::ops::bspline::cli::{grid, order, ORDER};
use crate::ops::kan::{KanLinear, KanLinearConfig};
use crate::ops::registry::{RunArgs, RunCommand, RunOutputs};

/// The layer of a run's input file: `grid`, `base_weight`, `spline_weight` and, with the
/// standalone scaler, `spline_scaler`.
fn layer(a: &RunArgs) -> Result<KanLinear> {
    let grid = grid(a)?;
    let order = order(a)?;
    let base = a.required("base_weight")?.clone();
    let scaler = a.optional("spline_scaler").cloned();
    if grid.n_knots() < 2 * order + 2 {
        return Err(Error::invalid(
            "--order",
            format!(
                "an order k with 2k + 2 <= {} knots per feature (a grid of G >= 1 intervals has G + 2k + 1)",
                grid.n_knots()
            ),
            order.to_string(),
        ));
    }
    let mut cfg = KanLinearConfig::new(grid.in_features(), base.shape().first().copied().unwrap_or(0));
    cfg.spline_order = order;
    cfg.grid_size = grid.n_knots().saturating_sub(2 * order + 1);
    cfg.standalone_scale_spline = scaler.is_some();
    KanLinear::from_parameters(cfg, grid, base, a.required("spline_weight")?.clone(), scaler)
}

fn backward(a: &RunArgs) -> Result<RunOutputs> {
    let g = layer(a)?.backward(a.required("x")?, a.required("dy")?)?;
    let mut v = vec![("dx", g.dx), ("d_base_weight", g.base_weight), ("d_spline_weight", g.spline_weight)];
    v.extend(g.spline_scaler.map(|t| ("d_spline_scaler", t)));
    Ok(v)
}

pub const COMMANDS: &[RunCommand] = &[
    RunCommand {
        name: "kan_linear",
        main_input: "x",
        options: &[ORDER],
        usage: "x (.., in), grid (in, n_knots) f32, base_weight, spline_weight[, spline_scaler] -> y",
        run: |a| Ok(vec![("y", layer(a)?.forward(a.required("x")?)?)]),
    },
    RunCommand {
        name: "kan_linear_backward",
        main_input: "x",
        options: &[ORDER],
        usage: "the same and dy -> dx, d_base_weight, d_spline_weight[, d_spline_scaler]",
        run: backward,
    },
];
