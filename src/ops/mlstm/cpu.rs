//! f64 references of the mLSTM cell with exponential input gate (mlstm_kernels' mLSTMexp);
//! also the CPU backend. Per head (`heads = batch * num_heads`), per step t:
//!
//! ```text
//! lf[t] = logsigmoid(f[t])
//! m[t]  = max(lf[t] + m[t-1], i[t])                          m[-1] = m0 (or 0)
//! C[t]  = exp(lf[t] + m[t-1] - m[t]) C[t-1] + exp(i[t] - m[t]) k[t] v[t]^T
//! n[t]  = exp(lf[t] + m[t-1] - m[t]) n[t-1] + exp(i[t] - m[t]) k[t]
//! q~    = q[t] / sqrt(dqk)
//! h[t]  = (q~^T C[t]) / (max(|q~ . n[t]|, exp(-m[t])) + eps)
//! ```
//!
//! Two forms of the forward: [`forward_recurrent`] steps the recurrence above;
//! [`forward_parallel`] writes every output as a weighted sum over earlier steps (the
//! quadratic form, a second opinion). The backward works on the parallel form.

/// An mLSTM problem widened to f64; `heads` is batch * num_heads, each head's sequence
/// contiguous.
#[derive(Clone, Debug)]
pub struct Mlstm64 {
    pub heads: usize,
    pub len: usize,
    pub dqk: usize,
    pub dhv: usize,
    /// (heads, len, dqk)
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    /// (heads, len, dhv)
    pub v: Vec<f64>,
    /// Input and forget gate preactivations, (heads, len).
    pub i: Vec<f64>,
    pub f: Vec<f64>,
    /// Initial states, all three or none: C (heads, dqk, dhv), n (heads, dqk), m (heads).
    pub initial: Option<State64>,
    pub eps: f64,
}

/// The recurrent state of every head: C (heads, dqk, dhv), n (heads, dqk), m (heads).
#[derive(Clone, Debug, PartialEq)]
pub struct State64 {
    pub c: Vec<f64>,
    pub n: Vec<f64>,
    pub m: Vec<f64>,
}

impl State64 {
    pub fn zeros(heads: usize, dqk: usize, dhv: usize) -> State64 {
        State64 { c: vec![0.0; heads * dqk * dhv], n: vec![0.0; heads * dqk], m: vec![0.0; heads] }
    }
}

/// `h` (heads, len, dhv) and the state after the last step.
#[derive(Clone, Debug)]
pub struct Forward64 {
    pub h: Vec<f64>,
    pub final_state: State64,
}

/// What the backward differentiates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NormalizerGrad {
    /// The derivative of the forward as written: through the denominator
    /// `max(|q~ . n|, exp(-m)) + eps` and through the max state m (which moves h only by
    /// its eps term). A gradient into the returned m flows too.
    #[default]
    Exact,
    /// The denominator and every `m[t]` held constant: the gradient of the numerator alone
    /// divided by the forward's denominator, the usual choice when a per-head norm follows h
    /// (which cancels h's per-step scale), and in bf16 far better conditioned than `Exact`
    /// where `|q~ . n|` is small. The returned state's m gets no gradient and passes none.
    ///
    /// Where it agrees with mlstm_kernels' chunkwise backward (`limit_chunk`): no initial
    /// state and a gradient into h only. Beyond that, mlstm_kernels ignores the gradients
    /// into the final n and m, returns zero gradients for the initial n and m, and leaves the
    /// term `sigmoid(-f) <dC_last, C_last>` out of df; this mode differentiates its documented
    /// function exactly, so with a final-state gradient the two differ.
    Constant,
}

/// Gradients, shaped like their inputs; the initial-state ones when it was given.
#[derive(Clone, Debug)]
pub struct Grads64 {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    pub di: Vec<f64>,
    pub df: Vec<f64>,
    pub dinitial: Option<State64>,
}

pub fn logsigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One recurrent step of one head on its state slices; returns nothing, writes `h`.
#[allow(clippy::too_many_arguments)]
pub fn step_head(
    c: &mut [f64],
    n: &mut [f64],
    m: &mut f64,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    i: f64,
    f: f64,
    eps: f64,
    h: &mut [f64],
) {
    let (dqk, dhv) = (q.len(), v.len());
    let lf = logsigmoid(f);
    let m_new = (lf + *m).max(i);
    let fa = (lf + *m - m_new).exp();
    let ia = (i - m_new).exp();
    *m = m_new;
    let scale = 1.0 / (dqk as f64).sqrt();
    h.iter_mut().for_each(|x| *x = 0.0);
    let mut den = 0.0;
    for a in 0..dqk {
        let qa = q[a] * scale;
        let row = &mut c[a * dhv..(a + 1) * dhv];
        for (j, cj) in row.iter_mut().enumerate() {
            *cj = fa * *cj + ia * k[a] * v[j];
            h[j] += qa * *cj;
        }
        n[a] = fa * n[a] + ia * k[a];
        den += qa * n[a];
    }
    let d = den.abs().max((-m_new).exp()) + eps;
    h.iter_mut().for_each(|x| *x /= d);
}

/// The recurrence, step by step.
pub fn forward_recurrent(p: &Mlstm64) -> Forward64 {
    let (len, dqk, dhv) = (p.len, p.dqk, p.dhv);
    let mut state = p.initial.clone().unwrap_or_else(|| State64::zeros(p.heads, dqk, dhv));
    let mut h = vec![0.0; p.heads * len * dhv];
    for hd in 0..p.heads {
        let c = &mut state.c[hd * dqk * dhv..(hd + 1) * dqk * dhv];
        let n = &mut state.n[hd * dqk..(hd + 1) * dqk];
        let m = &mut state.m[hd];
        for t in 0..len {
            let row = hd * len + t;
            step_head(
                c,
                n,
                m,
                &p.q[row * dqk..(row + 1) * dqk],
                &p.k[row * dqk..(row + 1) * dqk],
                &p.v[row * dhv..(row + 1) * dhv],
                p.i[row],
                p.f[row],
                p.eps,
                &mut h[row * dhv..(row + 1) * dhv],
            );
        }
    }
    Forward64 { h, final_state: state }
}

/// The rounding-error scale of every h element: the recurrence run on absolute values,
/// `(sum_s w[t,s] sum_a |q~[t,a] k[s,a]| |v[s,j]| + |h[t,j]| sum_s w[t,s] sum_a |q~[t,a] k[s,a]|) / d[t]`
/// with the initial state's terms alike: what a relative rounding of every term moves
/// `h = num / d` by, to first order. Plain relative error overstates a kernel's error where
/// the terms of the denominator cancel (h is then large and sensitive to any rounding);
/// [`crate::measure::scaled_error`] against this does not.
pub fn h_magnitude(p: &Mlstm64) -> Vec<f64> {
    let (len, dqk, dhv) = (p.len, p.dqk, p.dhv);
    let scale = 1.0 / (dqk as f64).sqrt();
    let reference = forward_recurrent(p);
    let mut out = vec![0.0; p.heads * len * dhv];
    for hd in 0..p.heads {
        let x = p.head(hd);
        let abs = |s: &[f64]| s.iter().map(|v| v.abs()).collect::<Vec<_>>();
        let (mut c_abs, mut n_abs, mut n) = match (x.c0, x.n0) {
            (Some(c0), Some(n0)) => (abs(c0), abs(n0), n0.to_vec()),
            _ => (vec![0.0; dqk * dhv], vec![0.0; dqk], vec![0.0; dqk]),
        };
        let mut m = x.m0;
        for t in 0..len {
            let lf = logsigmoid(x.f[t]);
            let m_new = (lf + m).max(x.i[t]);
            let (fa, ia) = ((lf + m - m_new).exp(), (x.i[t] - m_new).exp());
            m = m_new;
            let (q, k, v) = (&x.q[t * dqk..(t + 1) * dqk], &x.k[t * dqk..(t + 1) * dqk], &x.v[t * dhv..(t + 1) * dhv]);
            let (mut num_abs, mut den_abs, mut den) = (vec![0.0; dhv], 0.0, 0.0);
            for a in 0..dqk {
                let qa = q[a] * scale;
                for j in 0..dhv {
                    let e = &mut c_abs[a * dhv + j];
                    *e = fa * *e + ia * (k[a] * v[j]).abs();
                    num_abs[j] += qa.abs() * *e;
                }
                n_abs[a] = fa * n_abs[a] + ia * k[a].abs();
                n[a] = fa * n[a] + ia * k[a];
                den_abs += qa.abs() * n_abs[a];
                den += qa * n[a];
            }
            let d = den.abs().max((-m).exp()) + p.eps;
            let row = hd * len + t;
            let h = &reference.h[row * dhv..(row + 1) * dhv];
            for j in 0..dhv {
                out[row * dhv + j] = (num_abs[j] + h[j].abs() * den_abs) / d;
            }
        }
    }
    out
}

/// One head's gates in the parallel form: `b[t]` (sum of lf up to and including t), `m[t]`,
/// the initial state's log weight `b[t] + m0 - m[t]` and the pair weights.
struct Gates {
    b: Vec<f64>,
    m: Vec<f64>,
    m0: f64,
    /// `lf[t] + m[t-1] >= i[t]`: m carried the previous max at t (else it took i[t]).
    carried: Vec<bool>,
}

impl Gates {
    fn new(i: &[f64], f: &[f64], m0: f64) -> Gates {
        let len = i.len();
        let (mut b, mut m, mut carried) = (Vec::with_capacity(len), Vec::with_capacity(len), Vec::with_capacity(len));
        let (mut acc, mut prev) = (0.0, m0);
        for t in 0..len {
            let lf = logsigmoid(f[t]);
            acc += lf;
            b.push(acc);
            carried.push(lf + prev >= i[t]);
            prev = (lf + prev).max(i[t]);
            m.push(prev);
        }
        Gates { b, m, m0, carried }
    }

    /// Weight of step s's contribution in step t's state (s <= t), against `m_t`.
    fn w(&self, i: &[f64], t: usize, s: usize, m_t: f64) -> f64 {
        (i[s] + self.b[t] - self.b[s] - m_t).exp()
    }

    /// Weight of the initial state in step t's state, against `m_t`.
    fn w0(&self, t: usize, m_t: f64) -> f64 {
        (self.m0 + self.b[t] - m_t).exp()
    }
}

/// One head's slices of the inputs.
struct HeadView<'a> {
    q: &'a [f64],
    k: &'a [f64],
    v: &'a [f64],
    i: &'a [f64],
    f: &'a [f64],
    c0: Option<&'a [f64]>,
    n0: Option<&'a [f64]>,
    m0: f64,
}

impl Mlstm64 {
    fn head(&self, hd: usize) -> HeadView<'_> {
        let (len, dqk, dhv) = (self.len, self.dqk, self.dhv);
        HeadView {
            q: &self.q[hd * len * dqk..(hd + 1) * len * dqk],
            k: &self.k[hd * len * dqk..(hd + 1) * len * dqk],
            v: &self.v[hd * len * dhv..(hd + 1) * len * dhv],
            i: &self.i[hd * len..(hd + 1) * len],
            f: &self.f[hd * len..(hd + 1) * len],
            c0: self.initial.as_ref().map(|s| &s.c[hd * dqk * dhv..(hd + 1) * dqk * dhv]),
            n0: self.initial.as_ref().map(|s| &s.n[hd * dqk..(hd + 1) * dqk]),
            m0: self.initial.as_ref().map_or(0.0, |s| s.m[hd]),
        }
    }
}

/// One head's forward in the parallel form. `m_t` and `d_t` are the stabiliser and the
/// denominator per step; `fixed` replaces them (and the final state's m) with given values,
/// which is the function [`NormalizerGrad::Constant`] differentiates.
struct HeadForward {
    h: Vec<f64>,
    den: Vec<f64>,
    d: Vec<f64>,
    gates: Gates,
    c: Vec<f64>,
    n: Vec<f64>,
    m_final: f64,
}

fn parallel_head(p: &Mlstm64, x: &HeadView, fixed: Option<(&[f64], &[f64])>) -> HeadForward {
    let (len, dqk, dhv) = (p.len, p.dqk, p.dhv);
    let gates = Gates::new(x.i, x.f, x.m0);
    let scale = 1.0 / (dqk as f64).sqrt();
    let m_at = |t: usize| fixed.map_or(gates.m[t], |(m, _)| m[t]);
    let (mut num, mut den, mut d, mut h) = (vec![0.0; len * dhv], vec![0.0; len], vec![0.0; len], vec![0.0; len * dhv]);
    for t in 0..len {
        let qt = &x.q[t * dqk..(t + 1) * dqk];
        let mt = m_at(t);
        let num_t = &mut num[t * dhv..(t + 1) * dhv];
        if let (Some(c0), Some(n0)) = (x.c0, x.n0) {
            let w0 = gates.w0(t, mt);
            for a in 0..dqk {
                let wq = w0 * scale * qt[a];
                for j in 0..dhv {
                    num_t[j] += wq * c0[a * dhv + j];
                }
                den[t] += wq * n0[a];
            }
        }
        for s in 0..=t {
            let a = gates.w(x.i, t, s, mt) * scale * dot(qt, &x.k[s * dqk..(s + 1) * dqk]);
            for (nj, vj) in num_t.iter_mut().zip(&x.v[s * dhv..(s + 1) * dhv]) {
                *nj += a * vj;
            }
            den[t] += a;
        }
        d[t] = fixed.map_or(den[t].abs().max((-mt).exp()) + p.eps, |(_, d)| d[t]);
        for (hj, nj) in h[t * dhv..(t + 1) * dhv].iter_mut().zip(num_t.iter()) {
            *hj = nj / d[t];
        }
    }
    let (mut c, mut n) = (vec![0.0; dqk * dhv], vec![0.0; dqk]);
    let m_final = if len == 0 { x.m0 } else { m_at(len - 1) };
    if let (Some(c0), Some(n0)) = (x.c0, x.n0) {
        let w0 = if len == 0 { 1.0 } else { gates.w0(len - 1, m_final) };
        c.iter_mut().zip(c0).for_each(|(c, c0)| *c = w0 * c0);
        n.iter_mut().zip(n0).for_each(|(n, n0)| *n = w0 * n0);
    }
    for s in 0..len {
        let w = gates.w(x.i, len - 1, s, m_final);
        for a in 0..dqk {
            let wk = w * x.k[s * dqk + a];
            for j in 0..dhv {
                c[a * dhv + j] += wk * x.v[s * dhv + j];
            }
            n[a] += wk;
        }
    }
    HeadForward { h, den, d, gates, c, n, m_final }
}

/// Every output as a weighted sum over earlier steps: the same function as
/// [`forward_recurrent`], computed another way.
pub fn forward_parallel(p: &Mlstm64) -> Forward64 {
    let (len, dqk, dhv) = (p.len, p.dqk, p.dhv);
    let mut h = Vec::with_capacity(p.heads * len * dhv);
    let mut state = State64 { c: Vec::new(), n: Vec::new(), m: Vec::new() };
    for hd in 0..p.heads {
        let r = parallel_head(p, &p.head(hd), None);
        h.extend_from_slice(&r.h);
        state.c.extend_from_slice(&r.c);
        state.n.extend_from_slice(&r.n);
        state.m.push(r.m_final);
    }
    debug_assert_eq!(state.c.len(), p.heads * dqk * dhv);
    Forward64 { h, final_state: state }
}

/// The forward with every `m[t]` and denominator held at `fixed` = (m per (head, step),
/// denominator per (head, step)): the function whose gradient
/// [`NormalizerGrad::Constant`] is. For finite-difference checks.
pub fn forward_constant_normalizer(p: &Mlstm64, m: &[f64], d: &[f64]) -> Forward64 {
    let len = p.len;
    let mut h = Vec::new();
    let mut state = State64 { c: Vec::new(), n: Vec::new(), m: Vec::new() };
    for hd in 0..p.heads {
        let r = parallel_head(p, &p.head(hd), Some((&m[hd * len..(hd + 1) * len], &d[hd * len..(hd + 1) * len])));
        h.extend_from_slice(&r.h);
        state.c.extend_from_slice(&r.c);
        state.n.extend_from_slice(&r.n);
        state.m.push(r.m_final);
    }
    Forward64 { h, final_state: state }
}

/// `m[t]` and the denominator per (head, step) of the forward: what
/// [`forward_constant_normalizer`] holds fixed.
pub fn normalizers(p: &Mlstm64) -> (Vec<f64>, Vec<f64>) {
    let (mut m, mut d) = (Vec::new(), Vec::new());
    for hd in 0..p.heads {
        let r = parallel_head(p, &p.head(hd), None);
        m.extend_from_slice(&r.gates.m);
        d.extend_from_slice(&r.d);
    }
    (m, d)
}

/// Gradients of `sum(h * dh) + <dC, C_final> + <dn, n_final> + dm . m_final` (`dfinal`
/// absent: no final-state terms).
pub fn backward(p: &Mlstm64, dh: &[f64], dfinal: Option<&State64>, mode: NormalizerGrad) -> Grads64 {
    let (len, dqk, dhv) = (p.len, p.dqk, p.dhv);
    let mut g = Grads64 {
        dq: vec![0.0; p.heads * len * dqk],
        dk: vec![0.0; p.heads * len * dqk],
        dv: vec![0.0; p.heads * len * dhv],
        di: vec![0.0; p.heads * len],
        df: vec![0.0; p.heads * len],
        dinitial: p.initial.as_ref().map(|_| State64::zeros(p.heads, dqk, dhv)),
    };
    for hd in 0..p.heads {
        let x = p.head(hd);
        let fwd = parallel_head(p, &x, None);
        let dfin =
            dfinal.map(|s| (&s.c[hd * dqk * dhv..(hd + 1) * dqk * dhv], &s.n[hd * dqk..(hd + 1) * dqk], s.m[hd]));
        let r = backward_head(p, &x, &fwd, &dh[hd * len * dhv..(hd + 1) * len * dhv], dfin, mode);
        g.dq[hd * len * dqk..(hd + 1) * len * dqk].copy_from_slice(&r.dq);
        g.dk[hd * len * dqk..(hd + 1) * len * dqk].copy_from_slice(&r.dk);
        g.dv[hd * len * dhv..(hd + 1) * len * dhv].copy_from_slice(&r.dv);
        g.di[hd * len..(hd + 1) * len].copy_from_slice(&r.di);
        g.df[hd * len..(hd + 1) * len].copy_from_slice(&r.df);
        if let Some(s) = g.dinitial.as_mut() {
            s.c[hd * dqk * dhv..(hd + 1) * dqk * dhv].copy_from_slice(&r.dc0);
            s.n[hd * dqk..(hd + 1) * dqk].copy_from_slice(&r.dn0);
            s.m[hd] = r.dm0;
        }
    }
    g
}

struct HeadGrads {
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    di: Vec<f64>,
    df: Vec<f64>,
    dc0: Vec<f64>,
    dn0: Vec<f64>,
    dm0: f64,
}

/// The normaliser's n rides along C as an extra value column of ones: C' = [C | n],
/// v' = [v, 1], and the denominator's gradient is that column's output gradient.
fn backward_head(
    p: &Mlstm64,
    x: &HeadView,
    fwd: &HeadForward,
    dh: &[f64],
    dfinal: Option<(&[f64], &[f64], f64)>,
    mode: NormalizerGrad,
) -> HeadGrads {
    let (len, dqk, dhv) = (p.len, p.dqk, p.dhv);
    let ext = dhv + 1;
    let scale = 1.0 / (dqk as f64).sqrt();
    let gates = &fwd.gates;
    let vext = |s: usize, j: usize| if j < dhv { x.v[s * dhv + j] } else { 1.0 };
    // [C0 | n0] and [dC_final | dn_final], (dqk, dhv + 1).
    let c0ext: Option<Vec<f64>> = x.c0.zip(x.n0).map(|(c0, n0)| {
        (0..dqk).flat_map(|a| (0..ext).map(move |j| if j < dhv { c0[a * dhv + j] } else { n0[a] })).collect()
    });
    let dcext: Option<Vec<f64>> = dfinal.map(|(dc, dn, _)| {
        (0..dqk).flat_map(|a| (0..ext).map(move |j| if j < dhv { dc[a * dhv + j] } else { dn[a] })).collect()
    });
    let cfinal_ext: Vec<f64> =
        (0..dqk).flat_map(|a| (0..ext).map(move |j| if j < dhv { fwd.c[a * dhv + j] } else { fwd.n[a] })).collect();

    // dnum'[t] = (dh[t] / d[t], dden[t]); dm_branch[t]: the exp(-m) side of the max.
    let mut dnum = vec![0.0; len * ext];
    let mut dm_direct = vec![0.0; len];
    for t in 0..len {
        let d = fwd.d[t];
        let dht = &dh[t * dhv..(t + 1) * dhv];
        for j in 0..dhv {
            dnum[t * ext + j] = dht[j] / d;
        }
        if mode == NormalizerGrad::Exact {
            let h_dot = dot(dht, &fwd.h[t * dhv..(t + 1) * dhv]);
            let dd = -h_dot / d;
            let mt = gates.m[t];
            if fwd.den[t].abs() >= (-mt).exp() {
                dnum[t * ext + dhv] = fwd.den[t].signum() * dd;
            } else {
                dm_direct[t] = -(-mt).exp() * dd;
            }
        }
    }

    let q = |t: usize| &x.q[t * dqk..(t + 1) * dqk];
    let k = |s: usize| &x.k[s * dqk..(s + 1) * dqk];
    let (mut dqs, mut dk, mut dvext) = (vec![0.0; len * dqk], vec![0.0; len * dqk], vec![0.0; len * ext]);
    let mut dc0ext = vec![0.0; dqk * ext];
    let mut dm0 = 0.0;
    for t in 0..len {
        let mt = gates.m[t];
        let dn_t = &dnum[t * ext..(t + 1) * ext];
        for s in 0..=t {
            let w = gates.w(x.i, t, s, mt);
            let e: f64 = (0..ext).map(|j| dn_t[j] * vext(s, j)).sum();
            let qk = scale * dot(q(t), k(s));
            for a in 0..dqk {
                dqs[t * dqk + a] += w * e * k(s)[a];
                dk[s * dqk + a] += w * e * scale * q(t)[a];
            }
            for j in 0..ext {
                dvext[s * ext + j] += w * qk * dn_t[j];
            }
        }
        if let Some(c0) = &c0ext {
            let w0 = gates.w0(t, mt);
            for a in 0..dqk {
                let row = &c0[a * ext..(a + 1) * ext];
                let cd = dot(row, dn_t);
                dqs[t * dqk + a] += w0 * cd;
                dm0 += w0 * scale * q(t)[a] * cd;
                for j in 0..ext {
                    dc0ext[a * ext + j] += w0 * scale * q(t)[a] * dn_t[j];
                }
            }
        }
    }
    let mut final_dot = 0.0;
    if let (Some(dc), true) = (&dcext, len > 0) {
        let ms = fwd.m_final;
        for s in 0..len {
            let w = gates.w(x.i, len - 1, s, ms);
            for a in 0..dqk {
                let row = &dc[a * ext..(a + 1) * ext];
                dk[s * dqk + a] += w * (0..ext).map(|j| row[j] * vext(s, j)).sum::<f64>();
                for j in 0..ext {
                    dvext[s * ext + j] += w * row[j] * x.k[s * dqk + a];
                }
            }
        }
        final_dot = dot(dc, &cfinal_ext);
        if let Some(c0) = &c0ext {
            let w0 = gates.w0(len - 1, ms);
            dm0 += w0 * dot(dc, c0);
            dc0ext.iter_mut().zip(dc).for_each(|(g, d)| *g += w0 * d);
        }
    } else if let (Some(dc), Some(_)) = (&dcext, &c0ext) {
        // No steps: the final state is the initial one.
        dc0ext.iter_mut().zip(dc).for_each(|(g, d)| *g += d);
        final_dot = 0.0;
    }

    // Gate gradients: b[t] enters row t with + and column t with -.
    let mut db = vec![0.0; len];
    let mut di = vec![0.0; len];
    for t in 0..len {
        let r_t = scale * dot(q(t), &dqs[t * dqk..(t + 1) * dqk]);
        let c_t = dot(k(t), &dk[t * dqk..(t + 1) * dqk]);
        db[t] = r_t - c_t;
        di[t] = c_t;
        // With m held: the total derivative in m[t] of what depends on it explicitly.
        dm_direct[t] -= r_t;
    }
    if len > 0 {
        db[len - 1] += final_dot;
        dm_direct[len - 1] -= final_dot;
    }
    let mut dlf = vec![0.0; len];
    let mut acc = 0.0;
    for t in (0..len).rev() {
        acc += db[t];
        dlf[t] = acc;
    }
    if mode == NormalizerGrad::Exact {
        if let (Some((_, _, dm_final)), true) = (dfinal, len > 0) {
            dm_direct[len - 1] += dm_final;
        }
        // m[t] = max(lf[t] + m[t-1], i[t]): its gradient follows the branch taken.
        let mut carry = 0.0;
        for t in (0..len).rev() {
            let tot = dm_direct[t] + carry;
            if gates.carried[t] {
                dlf[t] += tot;
                carry = tot;
            } else {
                di[t] += tot;
                carry = 0.0;
            }
        }
        dm0 += carry;
        if len == 0 {
            if let Some((_, _, dm_final)) = dfinal {
                dm0 += dm_final;
            }
        }
    } else {
        // m is held constant: m0 moves the result only through the initial state's weight.
    }
    let df = (0..len).map(|t| dlf[t] * sigmoid(-x.f[t])).collect();
    let dq = dqs.iter().map(|g| g * scale).collect();
    let dv = (0..len * dhv).map(|e| dvext[(e / dhv) * ext + e % dhv]).collect();
    let dc0 = (0..dqk * dhv).map(|e| dc0ext[(e / dhv) * ext + e % dhv]).collect();
    let dn0 = (0..dqk).map(|a| dc0ext[a * ext + dhv]).collect();
    HeadGrads { dq, dk, dv, di, df, dc0, dn0, dm0 }
}
