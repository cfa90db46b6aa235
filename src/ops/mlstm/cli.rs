//! The mLSTM's `run` commands.

use crate::error::{Error, Result};
use crate::ops::mlstm::{mlstm, mlstm_backward, mlstm_step, MlstmInputs, MlstmState, NormalizerGrad, DEFAULT_EPS};
use crate::ops::registry::{RunArgs, RunCommand, RunOption, RunOutputs};
use crate::tensor::Tensor;

/// `--chunk N`: the GPU chunk (16, 32, 64, 128).
const CHUNK: RunOption = RunOption { name: "--chunk", takes_value: true };
/// `--constant-normalizer`: the backward holds the denominator and m constant.
const CONSTANT_NORMALIZER: RunOption = RunOption { name: "--constant-normalizer", takes_value: false };

/// The state named `c`, `n`, `m` (or `dc`, `dn`, `dm`) in the input file: all three, or none
/// (`Ok(None)`); a part of one is an error naming what is missing.
fn state(a: &RunArgs, names: [&'static str; 3]) -> Result<Option<MlstmState>> {
    let [c, n, m] = names.map(|name| a.optional(name).cloned());
    match (c, n, m) {
        (Some(c), Some(n), Some(m)) => Ok(Some(MlstmState { c, n, m })),
        (None, None, None) => Ok(None),
        (c, n, m) => {
            let have = |t: &Option<Tensor>, name| t.as_ref().map(|_| name);
            let given: Vec<&str> =
                [have(&c, names[0]), have(&n, names[1]), have(&m, names[2])].into_iter().flatten().collect();
            Err(Error::InvalidArgument {
                arg: "state",
                expected: format!("all of {} or none of them in {}", names.join(", "), a.input_path),
                found: format!("only {}", given.join(", ")),
            })
        }
    }
}

fn with_final_state(first: (&'static str, Tensor), s: MlstmState) -> Vec<(&'static str, Tensor)> {
    vec![first, ("c", s.c), ("n", s.n), ("m", s.m)]
}

fn sequence(a: &RunArgs, backward: bool) -> Result<RunOutputs> {
    let initial = state(a, ["c", "n", "m"])?;
    let inputs = MlstmInputs {
        initial: initial.as_ref(),
        chunk: a.number(CHUNK.name)?,
        ..MlstmInputs::new(a.required("q")?, a.required("k")?, a.required("v")?, a.required("i")?, a.required("f")?)
    };
    if !backward {
        let o = mlstm(&inputs)?;
        return Ok(with_final_state(("h", o.h), o.final_state));
    }
    let mode = if a.flag(CONSTANT_NORMALIZER.name) { NormalizerGrad::Constant } else { NormalizerGrad::Exact };
    let dfinal = state(a, ["dc", "dn", "dm"])?;
    let g = mlstm_backward(&inputs, a.required("dh")?, dfinal.as_ref(), mode, None)?;
    let mut v = vec![("dq", g.dq), ("dk", g.dk), ("dv", g.dv), ("di", g.di), ("df", g.df)];
    if let Some(s) = g.dinitial {
        v.extend([("dc0", s.c), ("dn0", s.n), ("dm0", s.m)]);
    }
    Ok(v)
}

fn step(a: &RunArgs) -> Result<RunOutputs> {
    let mut s = state(a, ["c", "n", "m"])?.ok_or_else(|| Error::InvalidArgument {
        arg: "c, n, m",
        expected: format!("the state in {}", a.input_path),
        found: "missing".into(),
    })?;
    let (q, k, v) = (a.required("q")?, a.required("k")?, a.required("v")?);
    let h = mlstm_step(&mut s, q, k, v, a.required("i")?, a.required("f")?, DEFAULT_EPS)?;
    Ok(with_final_state(("h", h), s))
}

pub const COMMANDS: &[RunCommand] = &[
    RunCommand {
        name: "mlstm",
        main_input: "q",
        options: &[CHUNK],
        usage: "q, k (B, NH, S, DQK), v (B, NH, S, DHV), i, f (B, NH, S) f32 and optionally an \
                initial state c (B, NH, DQK, DHV), n (B, NH, DQK), m (B, NH), all f32 -> h, c, n, m",
        run: |a| sequence(a, false),
    },
    RunCommand {
        name: "mlstm_backward",
        main_input: "q",
        options: &[CHUNK, CONSTANT_NORMALIZER],
        usage: "the same and dh[, dc, dn, dm]; --constant-normalizer holds the denominator and m \
                constant -> dq, dk, dv, di, df[, dc0, dn0, dm0]",
        run: |a| sequence(a, true),
    },
    RunCommand {
        name: "mlstm_step",
        main_input: "q",
        options: &[],
        usage: "q, k (B, NH, DQK), v (B, NH, DHV), i, f (B, NH) and c, n, m -> h, c, n, m",
        run: step,
    },
];
