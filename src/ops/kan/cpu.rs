//! f64 reference of KANLinear's forward and backward, also the CPU backend.
//!
//! ```text
//! y[b,o]   = sum_i SiLU(x[b,i]) Wb[o,i] + sum_i sum_j B_j(x[b,i]) Ws[o,i,j] s[o,i]
//! dWb[o,i] = sum_b dy[b,o] SiLU(x[b,i])
//! dWs[o,i,j] = sum_b dy[b,o] B_j(x[b,i]) s[o,i]
//! ds[o,i]  = sum_b dy[b,o] sum_j B_j(x[b,i]) Ws[o,i,j]
//! dx[b,i]  = sum_o dy[b,o] (SiLU'(x[b,i]) Wb[o,i] + sum_j B'_j(x[b,i]) Ws[o,i,j] s[o,i])
//! ```

use crate::ops::bspline::cpu::{basis_derivatives, basis_values};

/// Host copies of a layer's parameters, widened to f64.
pub struct Params64 {
    pub in_features: usize,
    pub out_features: usize,
    pub n_knots: usize,
    pub order: usize,
    /// (in, n_knots)
    pub knots: Vec<f64>,
    /// (out, in)
    pub base_weight: Vec<f64>,
    /// (out, in, nb)
    pub spline_weight: Vec<f64>,
    /// (out, in); None: all ones
    pub spline_scaler: Option<Vec<f64>>,
}

impl Params64 {
    pub fn n_bases(&self) -> usize {
        self.n_knots - 1 - self.order
    }

    fn scaler(&self, oi: usize) -> f64 {
        self.spline_scaler.as_ref().map_or(1.0, |s| s[oi])
    }

    fn knots_of(&self, i: usize) -> &[f64] {
        &self.knots[i * self.n_knots..(i + 1) * self.n_knots]
    }
}

pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

pub fn silu_grad(x: f64) -> f64 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

/// Per-row features: SiLU(x) (rows) and bases (rows x nb), rows = batch * in.
fn features(p: &Params64, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let nb = p.n_bases();
    let mut bases = vec![0.0; x.len() * nb];
    for (r, (&xv, out)) in x.iter().zip(bases.chunks_exact_mut(nb)).enumerate() {
        basis_values(xv, p.knots_of(r % p.in_features), p.order, out);
    }
    (x.iter().map(|&v| silu(v)).collect(), bases)
}

/// y (batch x out) for x (batch x in).
pub fn forward(p: &Params64, x: &[f64]) -> Vec<f64> {
    forward_terms(p, x, false)
}

/// The same sums over absolute values of every term: the scale that rounding errors of a
/// GEMM-based forward are proportional to (`|fl(y) - y| <= c eps magnitude`).
pub fn forward_magnitude(p: &Params64, x: &[f64]) -> Vec<f64> {
    forward_terms(p, x, true)
}

fn forward_terms(p: &Params64, x: &[f64], magnitude: bool) -> Vec<f64> {
    let m = |v: f64| if magnitude { v.abs() } else { v };
    let (inf, outf, nb) = (p.in_features, p.out_features, p.n_bases());
    let batch = x.len() / inf;
    let (act, bases) = features(p, x);
    let mut y = vec![0.0; batch * outf];
    for b in 0..batch {
        for o in 0..outf {
            let mut acc = 0.0;
            for i in 0..inf {
                let r = b * inf + i;
                let oi = o * inf + i;
                acc += m(act[r]) * m(p.base_weight[oi]);
                let w = &p.spline_weight[oi * nb..(oi + 1) * nb];
                let bs = &bases[r * nb..(r + 1) * nb];
                acc += m(p.scaler(oi)) * bs.iter().zip(w).map(|(a, b)| m(*a) * m(*b)).sum::<f64>();
            }
            y[b * outf + o] = acc;
        }
    }
    y
}

/// Gradients of `sum(y * dy)`.
pub struct Grads64 {
    pub dx: Vec<f64>,
    pub base_weight: Vec<f64>,
    pub spline_weight: Vec<f64>,
    pub spline_scaler: Option<Vec<f64>>,
}

pub fn backward(p: &Params64, x: &[f64], dy: &[f64]) -> Grads64 {
    backward_terms(p, x, dy, false)
}

/// [`backward`] over absolute values of every term (see [`forward_magnitude`]).
pub fn backward_magnitude(p: &Params64, x: &[f64], dy: &[f64]) -> Grads64 {
    backward_terms(p, x, dy, true)
}

fn backward_terms(p: &Params64, x: &[f64], dy: &[f64], magnitude: bool) -> Grads64 {
    let m = |v: f64| if magnitude { v.abs() } else { v };
    let (inf, outf, nb) = (p.in_features, p.out_features, p.n_bases());
    let batch = x.len() / inf;
    let (act, bases) = features(p, x);
    let mut dbases = vec![0.0; x.len() * nb];
    for (r, (&xv, out)) in x.iter().zip(dbases.chunks_exact_mut(nb)).enumerate() {
        basis_derivatives(xv, p.knots_of(r % inf), p.order, out);
    }
    let mut g = Grads64 {
        dx: vec![0.0; x.len()],
        base_weight: vec![0.0; outf * inf],
        spline_weight: vec![0.0; outf * inf * nb],
        spline_scaler: p.spline_scaler.as_ref().map(|s| vec![0.0; s.len()]),
    };
    for b in 0..batch {
        for o in 0..outf {
            let d = m(dy[b * outf + o]);
            for i in 0..inf {
                let r = b * inf + i;
                let oi = o * inf + i;
                let s = m(p.scaler(oi));
                let w = &p.spline_weight[oi * nb..(oi + 1) * nb];
                let bs = &bases[r * nb..(r + 1) * nb];
                let dbs = &dbases[r * nb..(r + 1) * nb];
                g.base_weight[oi] += d * m(act[r]);
                let mut spline_value = 0.0;
                let mut spline_slope = 0.0;
                for j in 0..nb {
                    g.spline_weight[oi * nb + j] += d * m(bs[j]) * s;
                    spline_value += m(bs[j]) * m(w[j]);
                    spline_slope += m(dbs[j]) * m(w[j]);
                }
                if let Some(ds) = g.spline_scaler.as_mut() {
                    ds[oi] += d * spline_value;
                }
                g.dx[r] += d * (m(silu_grad(x[r])) * m(p.base_weight[oi]) + spline_slope * s);
            }
        }
    }
    g
}
