//! f64 reference of the causal depthwise conv1d, forward, backward and the rolling-state
//! update; also the CPU backend. Semantics of the causal-conv1d package
//! (`causal_conv1d_ref`, `causal_conv1d_update_ref`), plus per-sequence resets:
//!
//! ```text
//! xp      = [initial_state (W-1 values, or zeros), x[0], ..., x[L-1]]     per (b, d)
//! pre[t]  = bias + sum_k weight[k] xp[t + k]          k = 0..W-1 (xp[t+W-1] = x[t])
//! out[t]  = SiLU(pre[t])                               (or pre[t] without the activation)
//! final   = xp[L .. L+W-1]                             the last W-1 inputs
//! ```
//!
//! With resets, `xp[t + k]` is x at position `s = t + k - (W-1)`, and it counts only when no
//! sequence starts in `(s, t]` (and, for the initial state, `s < 0`, none in `[0, t]`); the
//! final state hides what the last output could not see.

use crate::ops::kan::cpu::{silu, silu_grad};

/// A conv1d problem widened to f64; shapes as in [`super::ConvInputs`].
#[derive(Clone, Debug)]
pub struct Conv64 {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    pub width: usize,
    /// (batch, dim, len)
    pub x: Vec<f64>,
    /// (dim, width)
    pub weight: Vec<f64>,
    /// (dim)
    pub bias: Option<Vec<f64>>,
    /// (batch, dim, width - 1)
    pub initial_state: Option<Vec<f64>>,
    /// (batch, len): true where a new sequence starts.
    pub resets: Option<Vec<bool>>,
    pub silu: bool,
}

/// Forward results: `out` (batch, dim, len), `final_state` (batch, dim, width - 1).
#[derive(Clone, Debug)]
pub struct ConvForward64 {
    pub out: Vec<f64>,
    pub final_state: Vec<f64>,
}

/// Gradients of `sum(out * dout) + sum(final_state * dfinal)`, shaped like their inputs.
#[derive(Clone, Debug)]
pub struct ConvGrads64 {
    pub dx: Vec<f64>,
    pub dweight: Vec<f64>,
    pub dbias: Option<Vec<f64>>,
    pub dinitial_state: Option<Vec<f64>>,
}

impl Conv64 {
    /// The batch entries to walk: none when dim is 0, however large the batch, so the loops
    /// are bounded by the real work.
    fn batches_with_rows(&self) -> usize {
        if self.dim == 0 {
            0
        } else {
            self.batch
        }
    }

    fn state_len(&self) -> usize {
        self.width - 1
    }

    /// The earliest x position output `t` of row `b` may see: the latest sequence start at or
    /// before `t`, or `None` (everything back into the initial state) when there is none.
    fn floor(&self, b: usize, t: usize) -> Option<usize> {
        let r = self.resets.as_ref()?;
        (0..=t).rev().find(|&s| r[b * self.len + s])
    }

    /// Whether output `t` sees x position `s` (negative: the initial state).
    fn sees(&self, floor: Option<usize>, s: isize) -> bool {
        floor.is_none_or(|f| s >= f as isize)
    }

    /// xp at x position `s` in `-(W-1)..len` of row (b, d).
    fn xp(&self, b: usize, d: usize, s: isize) -> f64 {
        let row = b * self.dim + d;
        if s >= 0 {
            self.x[row * self.len + s as usize]
        } else {
            let j = (s + self.state_len() as isize) as usize;
            self.initial_state.as_ref().map_or(0.0, |h| h[row * self.state_len() + j])
        }
    }

    /// Pre-activation outputs of row (b, d).
    fn pre(&self, b: usize, d: usize) -> Vec<f64> {
        let w = &self.weight[d * self.width..][..self.width];
        let bias = self.bias.as_ref().map_or(0.0, |v| v[d]);
        (0..self.len)
            .map(|t| {
                let floor = self.floor(b, t);
                let mut acc = bias;
                for (k, &wk) in w.iter().enumerate() {
                    let s = t as isize + k as isize - self.state_len() as isize;
                    if self.sees(floor, s) {
                        acc += wk * self.xp(b, d, s);
                    }
                }
                acc
            })
            .collect()
    }

    /// The floor of the final state: what the last output sees (everything when len is 0).
    fn final_floor(&self, b: usize) -> Option<usize> {
        self.len.checked_sub(1).and_then(|t| self.floor(b, t))
    }
}

pub fn forward(p: &Conv64) -> ConvForward64 {
    let sl = p.state_len();
    let mut out = Vec::with_capacity(p.x.len());
    let mut final_state = Vec::with_capacity(p.batch * p.dim * sl);
    for b in 0..p.batches_with_rows() {
        let floor = p.final_floor(b);
        for d in 0..p.dim {
            out.extend(p.pre(b, d).into_iter().map(|v| if p.silu { silu(v) } else { v }));
            for j in 0..sl {
                let s = p.len as isize - sl as isize + j as isize;
                final_state.push(if p.sees(floor, s) { p.xp(b, d, s) } else { 0.0 });
            }
        }
    }
    ConvForward64 { out, final_state }
}

/// Gradients of `sum(out * dout) + sum(final_state * dfinal)`.
pub fn backward(p: &Conv64, dout: &[f64], dfinal: Option<&[f64]>) -> ConvGrads64 {
    let (sl, w_n, len) = (p.state_len(), p.width, p.len);
    let mut dx = vec![0.0; p.x.len()];
    let mut dweight = vec![0.0; p.dim * w_n];
    let mut dbias = vec![0.0; p.dim];
    let mut dinit = vec![0.0; p.batch * p.dim * sl];
    for b in 0..p.batches_with_rows() {
        let final_floor = p.final_floor(b);
        for d in 0..p.dim {
            let row = b * p.dim + d;
            let pre = p.pre(b, d);
            // dxp over x positions -(W-1)..len, offset by W-1.
            let mut dxp = vec![0.0; len + sl];
            for t in 0..len {
                let g = dout[row * len + t] * if p.silu { silu_grad(pre[t]) } else { 1.0 };
                dbias[d] += g;
                let floor = p.floor(b, t);
                for k in 0..w_n {
                    let s = t as isize + k as isize - sl as isize;
                    if p.sees(floor, s) {
                        dxp[t + k] += p.weight[d * w_n + k] * g;
                        dweight[d * w_n + k] += g * p.xp(b, d, s);
                    }
                }
            }
            if let Some(df) = dfinal {
                for j in 0..sl {
                    let s = len as isize - sl as isize + j as isize;
                    if p.sees(final_floor, s) {
                        dxp[len + j] += df[row * sl + j];
                    }
                }
            }
            dx[row * len..][..len].copy_from_slice(&dxp[sl..]);
            dinit[row * sl..][..sl].copy_from_slice(&dxp[..sl]);
        }
    }
    ConvGrads64 {
        dx,
        dweight,
        dbias: p.bias.as_ref().map(|_| dbias),
        dinitial_state: p.initial_state.as_ref().map(|_| dinit),
    }
}

/// One rolling-state update (`causal_conv1d_update_ref`) widened to f64.
#[derive(Clone, Debug)]
pub struct Update64 {
    /// batch * dim
    pub rows: usize,
    pub dim: usize,
    pub width: usize,
    /// At least width - 1.
    pub state_len: usize,
    pub tokens: usize,
    /// (rows, state_len)
    pub state: Vec<f64>,
    /// (rows, tokens)
    pub x: Vec<f64>,
    /// (dim, width)
    pub weight: Vec<f64>,
    /// (dim)
    pub bias: Option<Vec<f64>>,
    pub silu: bool,
}

/// Returns the outputs (rows, tokens), each token convolved with the W-1 values before it
/// in `[state, x]`, and the new state: the last `state_len` values of `[state, x]`.
pub fn update(p: &Update64) -> (Vec<f64>, Vec<f64>) {
    let (sl, tk, w_n) = (p.state_len, p.tokens, p.width);
    let mut out = Vec::with_capacity(p.rows * tk);
    let mut new_state = Vec::with_capacity(p.rows * sl);
    for row in 0..p.rows {
        let d = row % p.dim;
        let joined: Vec<f64> = p.state[row * sl..][..sl].iter().chain(&p.x[row * tk..][..tk]).copied().collect();
        for t in 0..tk {
            let mut acc = p.bias.as_ref().map_or(0.0, |v| v[d]);
            for k in 0..w_n {
                acc += p.weight[d * w_n + k] * joined[sl + t + 1 + k - w_n];
            }
            out.push(if p.silu { silu(acc) } else { acc });
        }
        new_state.extend_from_slice(&joined[tk..]);
    }
    (out, new_state)
}
