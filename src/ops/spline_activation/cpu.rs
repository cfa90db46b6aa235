//! f64 reference of the B-spline activation, also the CPU backend.
//!
//! ```text
//! y[r,c]     = sum_j coeff[c,j] B_j(x[r,c]) + w[c] SiLU(x[r,c])
//! dx[r,c]    = dy[r,c] (sum_j coeff[c,j] B'_j(x[r,c]) + w[c] SiLU'(x[r,c]))
//! dcoeff[c,j] = sum_r dy[r,c] B_j(x[r,c])
//! dw[c]      = sum_r dy[r,c] SiLU(x[r,c])
//! ```

use crate::ops::bspline::cpu::{basis_derivatives, basis_values};
use crate::ops::kan::cpu::{silu, silu_grad};

/// Host copies of an activation's parameters, widened to f64.
pub struct ActParams64 {
    pub channels: usize,
    pub n_knots: usize,
    pub order: usize,
    /// (channels, n_knots)
    pub knots: Vec<f64>,
    /// (channels, nb)
    pub coeff: Vec<f64>,
    /// (channels); None: no SiLU term
    pub base_weight: Option<Vec<f64>>,
}

impl ActParams64 {
    pub fn n_bases(&self) -> usize {
        self.n_knots - 1 - self.order
    }

    fn knots_of(&self, c: usize) -> &[f64] {
        &self.knots[c * self.n_knots..(c + 1) * self.n_knots]
    }
}

pub fn forward(p: &ActParams64, x: &[f64]) -> Vec<f64> {
    forward_terms(p, x, false)
}

/// Gradients of `sum(y * dy)`: (dx, dcoeff, dw).
pub fn backward(p: &ActParams64, x: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>, Option<Vec<f64>>) {
    backward_terms(p, x, dy, false)
}

/// Forward and backward over absolute values of every term: the scales of their rounding
/// errors (see `crate::measure::scaled_error`). Returns (y, dx, dcoeff, dw) magnitudes.
pub fn magnitudes(p: &ActParams64, x: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>, Option<Vec<f64>>) {
    let (dx, dcoeff, dw) = backward_terms(p, x, dy, true);
    (forward_terms(p, x, true), dx, dcoeff, dw)
}

fn forward_terms(p: &ActParams64, x: &[f64], magnitude: bool) -> Vec<f64> {
    let m = |v: f64| if magnitude { v.abs() } else { v };
    let nb = p.n_bases();
    let mut b = vec![0.0; nb];
    x.iter()
        .enumerate()
        .map(|(e, &xv)| {
            let c = e % p.channels;
            basis_values(xv, p.knots_of(c), p.order, &mut b);
            let spline: f64 = b.iter().zip(&p.coeff[c * nb..(c + 1) * nb]).map(|(a, w)| m(*a) * m(*w)).sum();
            spline + p.base_weight.as_ref().map_or(0.0, |w| m(w[c]) * m(silu(xv)))
        })
        .collect()
}

fn backward_terms(p: &ActParams64, x: &[f64], dy: &[f64], magnitude: bool) -> (Vec<f64>, Vec<f64>, Option<Vec<f64>>) {
    let m = |v: f64| if magnitude { v.abs() } else { v };
    let nb = p.n_bases();
    let (mut b, mut db) = (vec![0.0; nb], vec![0.0; nb]);
    let mut dx = vec![0.0; x.len()];
    let mut dcoeff = vec![0.0; p.channels * nb];
    let mut dw = p.base_weight.as_ref().map(|_| vec![0.0; p.channels]);
    for (e, (&xv, &dy_e)) in x.iter().zip(dy).enumerate() {
        let g = m(dy_e);
        let c = e % p.channels;
        basis_values(xv, p.knots_of(c), p.order, &mut b);
        basis_derivatives(xv, p.knots_of(c), p.order, &mut db);
        let coeff = &p.coeff[c * nb..(c + 1) * nb];
        let slope: f64 = db.iter().zip(coeff).map(|(a, w)| m(*a) * m(*w)).sum();
        let base = p.base_weight.as_ref().map_or(0.0, |w| m(w[c]) * m(silu_grad(xv)));
        dx[e] = g * (slope + base);
        for j in 0..nb {
            dcoeff[c * nb + j] += g * m(b[j]);
        }
        if let Some(dw) = dw.as_mut() {
            dw[c] += g * m(silu(xv));
        }
    }
    (dx, dcoeff, dw)
}
