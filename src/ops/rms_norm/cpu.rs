//! f64 reference for RMSNorm, also the CPU backend of [`super::rms_norm`] and
//! [`super::rms_norm_backward`].

/// `(y, rstd)` for rows of `dim` elements.
pub fn forward(x: &[f64], w: &[f64], dim: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let mut y = Vec::with_capacity(x.len());
    let mut rstd = Vec::with_capacity(x.len() / dim.max(1));
    for row in x.chunks_exact(dim) {
        let s = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / dim as f64 + eps).sqrt();
        y.extend(row.iter().zip(w).map(|(v, wc)| v * s * wc));
        rstd.push(s);
    }
    (y, rstd)
}

/// `(dx, dweight)` of `sum(y * dy)`, with the forward's `rstd` per row: for `xh = x rstd` and
/// `g = dy w`, `dx = rstd (g - xh mean(g xh))` (rstd's own dependence on x is the second term)
/// and `dweight = sum over rows of dy xh`.
pub fn backward(x: &[f64], w: &[f64], rstd: &[f64], dy: &[f64], dim: usize) -> (Vec<f64>, Vec<f64>) {
    let mut dx = Vec::with_capacity(x.len());
    let mut dw = vec![0.0; dim];
    for ((row, dyr), &s) in x.chunks_exact(dim).zip(dy.chunks_exact(dim)).zip(rstd) {
        let mean = row.iter().zip(dyr).zip(w).map(|((v, d), wc)| d * wc * v * s).sum::<f64>() / dim as f64;
        for (c, (v, d)) in row.iter().zip(dyr).enumerate() {
            dx.push(s * (d * w[c] - v * s * mean));
            dw[c] += d * v * s;
        }
    }
    (dx, dw)
}

/// The sizes of the terms each gradient element sums, `(|dx| terms, |dweight| terms)`:
/// `rstd (|g| + |xh| mean|g xh|)` and `sum over rows of |dy xh|`. dx cancels where a row is
/// one large value (at dim 1, `1 - xh^2 = eps / (x^2 + eps)`), so its error is measured against
/// these (`measure::scaled_error`) rather than against its own size.
pub fn magnitudes(x: &[f64], w: &[f64], rstd: &[f64], dy: &[f64], dim: usize) -> (Vec<f64>, Vec<f64>) {
    let mut dx = Vec::with_capacity(x.len());
    let mut dw = vec![0.0; dim];
    for ((row, dyr), &s) in x.chunks_exact(dim).zip(dy.chunks_exact(dim)).zip(rstd) {
        let mean = row.iter().zip(dyr).zip(w).map(|((v, d), wc)| (d * wc * v * s).abs()).sum::<f64>() / dim as f64;
        for (c, (v, d)) in row.iter().zip(dyr).enumerate() {
            dx.push(s * ((d * w[c]).abs() + (v * s).abs() * mean));
            dw[c] += (d * v * s).abs();
        }
    }
    (dx, dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backward_is_the_derivative_of_the_forward() {
        let (x, w, dy, dim, eps) =
            ([0.3, -1.2, 2.0, 0.7, -0.1, 0.05], [1.5, -0.5, 0.8], [0.2, 1.0, -0.7, 0.4, -0.3, 0.9], 3, 1e-5);
        let loss = |x: &[f64], w: &[f64]| forward(x, w, dim, eps).0.iter().zip(dy).map(|(a, b)| a * b).sum::<f64>();
        let (_, rstd) = forward(&x, &w, dim, eps);
        let (dx, dw) = backward(&x, &w, &rstd, &dy, dim);
        let h = 1e-6;
        for e in 0..x.len() {
            let (mut p, mut m) = (x, x);
            p[e] += h;
            m[e] -= h;
            let fd = (loss(&p, &w) - loss(&m, &w)) / (2.0 * h);
            assert!((fd - dx[e]).abs() < 1e-7, "dx[{e}]: {fd} vs {}", dx[e]);
        }
        for c in 0..dim {
            let (mut p, mut m) = (w, w);
            p[c] += h;
            m[c] -= h;
            let fd = (loss(&x, &p) - loss(&x, &m)) / (2.0 * h);
            assert!((fd - dw[c]).abs() < 1e-7, "dw[{c}]: {fd} vs {}", dw[c]);
        }
    }
}
