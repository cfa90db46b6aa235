//! f64 reference of the selective scan: the sequential recurrence, forward and backward;
//! also the CPU backend. Semantics of mamba-ssm's `selective_scan_ref`, plus an initial
//! state, a gradient into the last state and per-sequence resets:
//!
//! ```text
//! dt[t]   = softplus(delta[t] + bias)          (or delta[t] + bias without softplus)
//! a[t,n]  = exp(dt[t] A[n])                     (0 where a sequence starts at t)
//! h[t,n]  = a[t,n] h[t-1,n] + dt[t] B[t,n] u[t]    h[-1] = h0 (or 0)
//! y[t]    = sum_n C[t,n] h[t,n] + D u[t]
//! out[t]  = y[t] SiLU(z[t])                     (or y[t] without z)
//! ```
//!
//! Softplus is PyTorch's: `x` itself above 20, as mamba-ssm's kernels do.

use crate::ops::kan::cpu::{silu, silu_grad};

/// Where B (or C) comes from: one value per (batch, group, state, time), or one per
/// (channel, state), constant in time.
#[derive(Clone, Debug)]
pub enum Param64 {
    /// (batch, groups, dstate, len)
    Variable(Vec<f64>),
    /// (dim, dstate)
    Constant(Vec<f64>),
}

/// A selective-scan problem widened to f64; shapes as in [`super::ScanInputs`].
#[derive(Clone, Debug)]
pub struct Scan64 {
    pub batch: usize,
    pub dim: usize,
    pub dstate: usize,
    pub len: usize,
    /// Groups of B and C when variable (dim is a multiple); 1 when both are constant.
    pub groups: usize,
    /// (batch, dim, len)
    pub u: Vec<f64>,
    /// (batch, dim, len)
    pub delta: Vec<f64>,
    /// (dim, dstate)
    pub a: Vec<f64>,
    pub b: Param64,
    pub c: Param64,
    /// (dim)
    pub d: Option<Vec<f64>>,
    /// (batch, dim, len)
    pub z: Option<Vec<f64>>,
    /// (dim)
    pub delta_bias: Option<Vec<f64>>,
    pub delta_softplus: bool,
    /// (batch, dim, dstate)
    pub h0: Option<Vec<f64>>,
    /// (batch, len): true where a new sequence starts (the state before it is dropped).
    pub resets: Option<Vec<bool>>,
}

/// Forward results: `out` (batch, dim, len), `last_state` (batch, dim, dstate).
#[derive(Clone, Debug)]
pub struct Forward64 {
    pub out: Vec<f64>,
    pub last_state: Vec<f64>,
}

/// Gradients of `sum(out * dout) + sum(last_state * dlast)`, shaped like their inputs.
#[derive(Clone, Debug)]
pub struct Grads64 {
    pub du: Vec<f64>,
    pub ddelta: Vec<f64>,
    pub da: Vec<f64>,
    pub db: Vec<f64>,
    pub dc: Vec<f64>,
    pub dd: Option<Vec<f64>>,
    pub dz: Option<Vec<f64>>,
    pub ddelta_bias: Option<Vec<f64>>,
    pub dh0: Option<Vec<f64>>,
}

pub fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn softplus_grad(x: f64) -> f64 {
    if x > 20.0 {
        1.0
    } else {
        1.0 / (1.0 + (-x).exp())
    }
}

impl Scan64 {
    fn row(&self, b: usize, d: usize) -> usize {
        (b * self.dim + d) * self.len
    }

    fn group_of(&self, d: usize) -> usize {
        d / (self.dim / self.groups)
    }

    fn param(&self, p: &Param64, b: usize, d: usize, n: usize, t: usize) -> f64 {
        match p {
            Param64::Variable(v) => v[((b * self.groups + self.group_of(d)) * self.dstate + n) * self.len + t],
            Param64::Constant(v) => v[d * self.dstate + n],
        }
    }

    /// (pre-activation, dt) at (b, d, t).
    fn dt(&self, b: usize, d: usize, t: usize) -> (f64, f64) {
        let x = self.delta[self.row(b, d) + t] + self.delta_bias.as_ref().map_or(0.0, |v| v[d]);
        (x, if self.delta_softplus { softplus(x) } else { x })
    }

    fn reset(&self, b: usize, t: usize) -> bool {
        self.resets.as_ref().is_some_and(|r| r[b * self.len + t])
    }

    /// States h[t] for t in 0..len of row (b, d), `len * dstate` values, and y[t]
    /// (before the skip term and the gate).
    fn states(&self, b: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
        let (n_st, len) = (self.dstate, self.len);
        let mut h: Vec<f64> = match &self.h0 {
            Some(h0) => h0[(b * self.dim + d) * n_st..][..n_st].to_vec(),
            None => vec![0.0; n_st],
        };
        let mut hs = vec![0.0; len * n_st];
        let mut ys = vec![0.0; len];
        let r = self.row(b, d);
        for t in 0..len {
            let (_, dt) = self.dt(b, d, t);
            // A reset replaces the state rather than scaling it by 0, so that nothing of the
            // sequence before (not even an inf, 0 * inf being NaN) reaches this one.
            let fresh = self.reset(b, t);
            let mut y = 0.0;
            for (n, hn) in h.iter_mut().enumerate() {
                let carried = if fresh { 0.0 } else { (dt * self.a[d * n_st + n]).exp() * *hn };
                *hn = carried + dt * self.param(&self.b, b, d, n, t) * self.u[r + t];
                y += self.param(&self.c, b, d, n, t) * *hn;
                hs[t * n_st + n] = *hn;
            }
            ys[t] = y;
        }
        (hs, ys)
    }
}

pub fn forward(p: &Scan64) -> Forward64 {
    let (bt, dm, n_st, len) = (p.batch, p.dim, p.dstate, p.len);
    let mut out = vec![0.0; bt * dm * len];
    let mut last = vec![0.0; bt * dm * n_st];
    // One loop over the (batch, dim) rows: bounded by the real work even when dim is 0 and
    // batch is huge.
    for row in 0..bt * dm {
        let (b, d) = (row / dm, row % dm);
        {
            let (hs, ys) = p.states(b, d);
            let r = p.row(b, d);
            for t in 0..len {
                let y = ys[t] + p.d.as_ref().map_or(0.0, |v| v[d]) * p.u[r + t];
                out[r + t] = match &p.z {
                    Some(z) => y * silu(z[r + t]),
                    None => y,
                };
            }
            let base = (b * dm + d) * n_st;
            match &p.h0 {
                // An empty sequence leaves the initial state as it is.
                Some(h0) if len == 0 => last[base..base + n_st].copy_from_slice(&h0[base..base + n_st]),
                _ if len == 0 => {}
                _ => last[base..base + n_st].copy_from_slice(&hs[(len - 1) * n_st..]),
            }
        }
    }
    Forward64 { out, last_state: last }
}

/// Gradients of `sum(out * dout) + sum(last_state * dlast)`.
pub fn backward(p: &Scan64, dout: &[f64], dlast: Option<&[f64]>) -> Grads64 {
    let (bt, dm, n_st, len) = (p.batch, p.dim, p.dstate, p.len);
    let mut du = vec![0.0; bt * dm * len];
    let mut ddelta = vec![0.0; bt * dm * len];
    let mut da = vec![0.0; dm * n_st];
    let param_grad = |v: &Param64| match v {
        Param64::Variable(x) => vec![0.0; x.len()],
        Param64::Constant(x) => vec![0.0; x.len()],
    };
    let mut db = param_grad(&p.b);
    let mut dc = param_grad(&p.c);
    let mut dd = p.d.as_ref().map(|_| vec![0.0; dm]);
    let mut dz = p.z.as_ref().map(|_| vec![0.0; bt * dm * len]);
    let mut dbias = p.delta_bias.as_ref().map(|_| vec![0.0; dm]);
    let mut dh0 = p.h0.as_ref().map(|_| vec![0.0; bt * dm * n_st]);
    let bc_index = |v: &Param64, b: usize, d: usize, n: usize, t: usize| match v {
        Param64::Variable(_) => ((b * p.groups + p.group_of(d)) * n_st + n) * len + t,
        Param64::Constant(_) => d * n_st + n,
    };
    for row in 0..bt * dm {
        let (b, d) = (row / dm, row % dm);
        {
            let (hs, ys) = p.states(b, d);
            let r = p.row(b, d);
            let dskip = p.d.as_ref().map_or(0.0, |v| v[d]);
            let sbase = (b * dm + d) * n_st;
            // g_next[n]: the gradient reaching h[t, n] from step t + 1 (from dlast at the end).
            let mut g_next: Vec<f64> = match dlast {
                Some(v) => v[sbase..sbase + n_st].to_vec(),
                None => vec![0.0; n_st],
            };
            for t in (0..len).rev() {
                let y = ys[t] + dskip * p.u[r + t];
                let dy = match (&p.z, dz.as_mut()) {
                    (Some(z), Some(dz)) => {
                        dz[r + t] = dout[r + t] * y * silu_grad(z[r + t]);
                        dout[r + t] * silu(z[r + t])
                    }
                    _ => dout[r + t],
                };
                if let Some(dd) = dd.as_mut() {
                    dd[d] += dy * p.u[r + t];
                }
                let (x, dt) = p.dt(b, d, t);
                let u = p.u[r + t];
                // At a reset the step starts from zero: no term through the state before it,
                // and no gradient into it (selected, not multiplied by 0).
                let fresh = p.reset(b, t);
                let mut du_t = dskip * dy;
                let mut ddt = 0.0;
                for n in 0..n_st {
                    let h_prev = if fresh {
                        0.0
                    } else if t > 0 {
                        hs[(t - 1) * n_st + n]
                    } else {
                        p.h0.as_ref().map_or(0.0, |h0| h0[sbase + n])
                    };
                    let an = p.a[d * n_st + n];
                    let a = if fresh { 0.0 } else { (dt * an).exp() };
                    let bv = p.param(&p.b, b, d, n, t);
                    let cv = p.param(&p.c, b, d, n, t);
                    let g = g_next[n] + cv * dy;
                    dc[bc_index(&p.c, b, d, n, t)] += dy * hs[t * n_st + n];
                    db[bc_index(&p.b, b, d, n, t)] += g * dt * u;
                    du_t += g * dt * bv;
                    ddt += g * (bv * u + an * a * h_prev);
                    da[d * n_st + n] += g * dt * a * h_prev;
                    g_next[n] = if fresh { 0.0 } else { a * g };
                }
                du[r + t] = du_t;
                let dx = if p.delta_softplus { ddt * softplus_grad(x) } else { ddt };
                ddelta[r + t] = dx;
                if let Some(db) = dbias.as_mut() {
                    db[d] += dx;
                }
            }
            if let Some(dh0) = dh0.as_mut() {
                dh0[sbase..sbase + n_st].copy_from_slice(&g_next);
            }
        }
    }
    Grads64 { du, ddelta, da, db, dc, dd, dz, ddelta_bias: dbias, dh0 }
}
