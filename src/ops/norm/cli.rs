//! The norms' `run` commands.

use crate::error::Result;
use crate::ops::norm::{add_norm, add_norm_backward, norm, norm_backward, Norm, NormStats, DEFAULT_EPS};
use crate::ops::registry::{RunArgs, RunCommand, RunOption, RunOutputs};
use crate::tensor::Tensor;

/// `--layer`: LayerNorm (else RMSNorm).
const LAYER: RunOption = RunOption { name: "--layer", takes_value: false };
/// `--groups N`: normalise each row in N equal groups (xLSTM's multi-head norm).
const GROUPS: RunOption = RunOption { name: "--groups", takes_value: true };

fn spec(a: &RunArgs) -> Result<Norm> {
    let n = if a.flag(LAYER.name) { Norm::layer(DEFAULT_EPS) } else { Norm::rms(DEFAULT_EPS) };
    Ok(n.grouped(a.number(GROUPS.name)?.unwrap_or(1)))
}

/// The forward: `add_norm` when the file has a `residual`, else `norm`. Returns y, the sum (when
/// a residual was added) and the statistics.
fn forward(a: &RunArgs) -> Result<(Tensor, Option<Tensor>, NormStats)> {
    let (x, w, b) = (a.required("x")?, a.required("weight")?, a.optional("bias"));
    match a.optional("residual") {
        Some(r) => {
            let o = add_norm(x, Some(r), w, b, spec(a)?)?;
            Ok((o.y, Some(o.residual), o.stats))
        }
        None => {
            let o = norm(x, w, b, spec(a)?)?;
            Ok((o.y, None, o.stats))
        }
    }
}

fn with_stats(mut out: RunOutputs, stats: NormStats) -> RunOutputs {
    out.push(("rstd", stats.rstd));
    if let Some(m) = stats.mean {
        out.push(("mean", m));
    }
    out
}

fn run_forward(a: &RunArgs) -> Result<RunOutputs> {
    let (y, z, stats) = forward(a)?;
    let mut out = vec![("y", y)];
    if let Some(z) = z {
        out.push(("residual_out", z));
    }
    Ok(with_stats(out, stats))
}

fn run_backward(a: &RunArgs) -> Result<RunOutputs> {
    let (w, b, dy) = (a.required("weight")?, a.optional("bias"), a.required("dy")?);
    let (_, z, stats) = forward(a)?;
    let g = match &z {
        Some(z) => add_norm_backward(z, w, b, &stats, dy, a.optional("dresidual"))?,
        None => norm_backward(a.required("x")?, w, b, &stats, dy)?,
    };
    let mut out = vec![("dx", g.dx), ("dweight", g.dweight)];
    if let Some(db) = g.dbias {
        out.push(("dbias", db));
    }
    if let Some(dr) = g.dresidual {
        out.push(("dresidual_in", dr));
    }
    Ok(out)
}

pub const COMMANDS: &[RunCommand] = &[
    RunCommand {
        name: "norm",
        main_input: "x",
        options: &[LAYER, GROUPS],
        usage: "x (.., dim), weight (dim) f32, optional bias (dim) f32 and residual (.., dim) f32 (added \
                first) -> y, residual_out (with a residual), rstd, mean (--layer); RMSNorm unless \
                --layer, eps 1e-5, --groups N",
        run: run_forward,
    },
    RunCommand {
        name: "norm_backward",
        main_input: "x",
        options: &[LAYER, GROUPS],
        usage: "the same and dy, optional dresidual (f32) -> dx, dweight, dbias (with a bias), \
                dresidual_in (with a residual)",
        run: run_backward,
    },
];
