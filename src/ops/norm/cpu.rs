//! f64 reference for the norms, also the CPU backend of [`super::norm`], [`super::add_norm`]
//! and their backwards.

use super::{NormDims, NormKind};

/// The forward's results, all in f64: y, the normalised input z = x (+ residual), and per
/// group-row mean (zeros for RMSNorm) and rstd.
pub struct Forward {
    pub y: Vec<f64>,
    pub z: Vec<f64>,
    pub mean: Vec<f64>,
    pub rstd: Vec<f64>,
}

/// `x + residual` as the residual stream holds it: each sum rounded once to f32, as on the
/// GPU (everything after it starts from that rounding).
pub fn residual_sum(x: &[f64], residual: &[f64]) -> Vec<f64> {
    x.iter().zip(residual).map(|(a, b)| (a + b) as f32 as f64).collect()
}

/// The forward of the normalised input `z` (x, or [`residual_sum`]) over `d.rows` rows of
/// `d.groups` groups of `d.dim` elements; `w` and `b` span a row (`groups * dim`).
pub fn forward(z: &[f64], w: &[f64], b: Option<&[f64]>, d: &NormDims, kind: NormKind, eps: f64) -> Forward {
    let z = z.to_vec();
    let (groups, dim) = (d.groups, d.dim);
    let mut y = Vec::with_capacity(z.len());
    let mut mean = Vec::with_capacity(d.group_rows());
    let mut rstd = Vec::with_capacity(d.group_rows());
    for (r, zr) in z.chunks_exact(dim).enumerate() {
        let m = match kind {
            NormKind::Layer => zr.iter().sum::<f64>() / dim as f64,
            NormKind::Rms => 0.0,
        };
        let s = 1.0 / (zr.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / dim as f64 + eps).sqrt();
        let off = (r % groups) * dim;
        y.extend(zr.iter().enumerate().map(|(c, v)| (v - m) * s * w[off + c] + b.map_or(0.0, |b| b[off + c])));
        mean.push(m);
        rstd.push(s);
    }
    Forward { y, z, mean, rstd }
}

/// The backward's results in f64: dz (dx, plus dresidual when given), dweight, dbias.
pub struct Backward {
    pub dz: Vec<f64>,
    pub dweight: Vec<f64>,
    pub dbias: Vec<f64>,
}

/// Gradients of `sum(y * dy) + sum(z * dresidual)` from the forward's statistics (`mean` None
/// for RMSNorm): with `xh = (z - mean) rstd` and `g = dy w`,
/// `dz = rstd (g - mean(g) - xh mean(g xh)) + dresidual` (no `mean(g)` for RMSNorm: its mean
/// is not a function of z), `dweight = sum over rows of dy xh`, `dbias = sum of dy`.
pub fn backward(
    z: &[f64],
    w: &[f64],
    mean: Option<&[f64]>,
    rstd: &[f64],
    dy: &[f64],
    dresidual: Option<&[f64]>,
    d: &NormDims,
) -> Backward {
    let (groups, dim) = (d.groups, d.dim);
    let mut dz = Vec::with_capacity(z.len());
    let mut dw = vec![0.0; groups * dim];
    let mut db = vec![0.0; groups * dim];
    for (r, (zr, dyr)) in z.chunks_exact(dim).zip(dy.chunks_exact(dim)).enumerate() {
        let (m, s, off) = (mean.map_or(0.0, |m| m[r]), rstd[r], (r % groups) * dim);
        let xh = |c: usize| (zr[c] - m) * s;
        let g = |c: usize| dyr[c] * w[off + c];
        let mean_gxh = (0..dim).map(|c| g(c) * xh(c)).sum::<f64>() / dim as f64;
        let mean_g = if mean.is_some() { (0..dim).map(g).sum::<f64>() / dim as f64 } else { 0.0 };
        for c in 0..dim {
            let res = dresidual.map_or(0.0, |dr| dr[r * dim + c]);
            dz.push(s * (g(c) - mean_g - xh(c) * mean_gxh) + res);
            dw[off + c] += dyr[c] * xh(c);
            db[off + c] += dyr[c];
        }
    }
    Backward { dz, dweight: dw, dbias: db }
}

/// The sizes of the terms each gradient element sums, as a [`Backward`]: `rstd (|g| + mean|g| +
/// |xh| mean|g xh|) + |dresidual|`, and the sums of `|dy xh|` and `|dy|`. dz cancels where a
/// group is one large value (at dim 1 RMSNorm's `1 - xh^2 = eps / (z^2 + eps)`, LayerNorm's dz
/// is exactly 0), so its error is measured against these (`measure::scaled_error`) rather than
/// against its own size.
pub fn magnitudes(
    z: &[f64],
    w: &[f64],
    mean: Option<&[f64]>,
    rstd: &[f64],
    dy: &[f64],
    dresidual: Option<&[f64]>,
    d: &NormDims,
) -> Backward {
    let abs = |v: &[f64]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
    let (dy, w) = (abs(dy), abs(w));
    let (dim, groups) = (d.dim, d.groups);
    let mut dz = Vec::with_capacity(z.len());
    let mut dw = vec![0.0; groups * dim];
    let mut db = vec![0.0; groups * dim];
    for (r, (zr, dyr)) in z.chunks_exact(dim).zip(dy.chunks_exact(dim)).enumerate() {
        let (m, s, off) = (mean.map_or(0.0, |m| m[r]), rstd[r], (r % groups) * dim);
        let xh = |c: usize| ((zr[c] - m) * s).abs();
        let g = |c: usize| dyr[c] * w[off + c];
        let mean_gxh = (0..dim).map(|c| g(c) * xh(c)).sum::<f64>() / dim as f64;
        let mean_g = if mean.is_some() { (0..dim).map(g).sum::<f64>() / dim as f64 } else { 0.0 };
        for c in 0..dim {
            let res = dresidual.map_or(0.0, |dr| dr[r * dim + c].abs());
            dz.push(s * (g(c) + mean_g + xh(c) * mean_gxh) + res);
            dw[off + c] += dyr[c] * xh(c);
            db[off + c] += dyr[c];
        }
    }
    Backward { dz, dweight: dw, dbias: db }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    /// Finite differences of `sum(y * dy) + sum(z * dres)` against the analytic backward, for
    /// both kinds, with and without bias, residual and groups.
    #[test]
    fn the_backward_is_the_derivative_of_the_forward() {
        let x = [0.3, -1.2, 2.0, 0.7, -0.1, 0.05, 1.4, -0.6, 0.9, 0.2, -0.8, 1.1];
        let res = [0.1, 0.4, -0.3, 0.2, 0.6, -0.5, 0.05, 0.3, -0.2, 0.7, 0.1, -0.4];
        let w = [1.5, -0.5, 0.8, 1.1, -0.9, 0.4];
        let b = [0.2, -0.1, 0.3, 0.0, 0.5, -0.7];
        let dy = [0.2, 1.0, -0.7, 0.4, -0.3, 0.9, 0.5, -0.2, 0.1, 0.8, -0.6, 0.3];
        let dres = [0.3, -0.1, 0.2, 0.0, 0.4, -0.2, 0.1, 0.5, -0.3, 0.2, 0.0, 0.6];
        for kind in [NormKind::Rms, NormKind::Layer] {
            for groups in [1, 2, 3] {
                for with_residual in [false, true] {
                    let d = NormDims { rows: 2, groups, dim: 6 / groups, dtype: DType::F32 };
                    // z = x + residual (the rounding to f32 aside, which the op adds): the
                    // derivative in x is the derivative in z.
                    let r = with_residual.then_some(&res[..]);
                    let dr = with_residual.then_some(&dres[..]);
                    let sum = |x: &[f64]| -> Vec<f64> {
                        r.map_or_else(|| x.to_vec(), |r| x.iter().zip(r).map(|(a, b)| a + b).collect())
                    };
                    let loss = |x: &[f64], w: &[f64], b: &[f64]| {
                        let f = forward(&sum(x), w, Some(b), &d, kind, 1e-5);
                        let zterm = dr.map_or(0.0, |dr| f.z.iter().zip(dr).map(|(a, b)| a * b).sum::<f64>());
                        f.y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>() + zterm
                    };
                    let f = forward(&sum(&x), &w, Some(&b), &d, kind, 1e-5);
                    let mean = (kind == NormKind::Layer).then_some(&f.mean[..]);
                    let g = backward(&f.z, &w, mean, &f.rstd, &dy, dr, &d);
                    let h = 1e-6;
                    let fd = |v: &[f64], e: usize, at: &dyn Fn(&[f64]) -> f64| {
                        let (mut p, mut m) = (v.to_vec(), v.to_vec());
                        p[e] += h;
                        m[e] -= h;
                        (at(&p) - at(&m)) / (2.0 * h)
                    };
                    for e in 0..x.len() {
                        let n = fd(&x, e, &|x| loss(x, &w, &b));
                        assert!(
                            (n - g.dz[e]).abs() < 1e-7,
                            "{kind:?} g{groups} r{with_residual} dx[{e}]: {n} vs {}",
                            g.dz[e]
                        );
                    }
                    for c in 0..w.len() {
                        let n = fd(&w, c, &|w| loss(&x, w, &b));
                        assert!((n - g.dweight[c]).abs() < 1e-7, "dw[{c}]: {n} vs {}", g.dweight[c]);
                        let n = fd(&b, c, &|b| loss(&x, &w, b));
                        assert!((n - g.dbias[c]).abs() < 1e-7, "db[{c}]: {n} vs {}", g.dbias[c]);
                    }
                }
            }
        }
    }
}
