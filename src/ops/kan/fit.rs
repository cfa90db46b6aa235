//! Host-side f64 fitting for KANLinear: efficient-kan's initialisation (`reset_parameters`,
//! `curve2coeff`), its grid update (`update_grid`) and `regularization_loss`.
//!
//! Least squares: per input feature, the coefficients X (nb x out) minimise
//! ||A X - Y|| for the basis matrix A (samples x nb). They are solved from the normal
//! equations (A^T A + lambda I) X = A^T Y by Cholesky in f64. lambda is 1e-10 of the mean
//! diagonal, which leaves well-posed fits unchanged to ~1e-10 and sends coefficients of bases
//! that no sample touches to ~0, as a minimum-norm solution would (torch's `lstsq`).

use crate::ops::bspline::cpu::basis_values;
use crate::rng::Rng;

/// Solves (A^T A + lambda I) X = A^T Y in place: `ata` (n x n) is destroyed and `aty`
/// (n x m) becomes X. Returns false if the system is not positive definite (only when
/// values are non-finite).
pub fn solve_normal_equations(ata: &mut [f64], aty: &mut [f64], n: usize, m: usize) -> bool {
    let trace: f64 = (0..n).map(|i| ata[i * n + i]).sum();
    let lambda = 1e-10 * (trace / n as f64).max(1e-300);
    for i in 0..n {
        ata[i * n + i] += lambda;
    }
    // Cholesky: ata = L L^T, L stored in the lower triangle.
    for j in 0..n {
        let mut d = ata[j * n + j];
        for k in 0..j {
            d -= ata[j * n + k] * ata[j * n + k];
        }
        if d.is_nan() || d <= 0.0 {
            return false;
        }
        let d = d.sqrt();
        ata[j * n + j] = d;
        for i in j + 1..n {
            let mut v = ata[i * n + j];
            for k in 0..j {
                v -= ata[i * n + k] * ata[j * n + k];
            }
            ata[i * n + j] = v / d;
        }
    }
    for c in 0..m {
        // forward: L z = b
        for i in 0..n {
            let mut v = aty[i * m + c];
            for k in 0..i {
                v -= ata[i * n + k] * aty[k * m + c];
            }
            aty[i * m + c] = v / ata[i * n + i];
        }
        // backward: L^T x = z
        for i in (0..n).rev() {
            let mut v = aty[i * m + c];
            for k in i + 1..n {
                v -= ata[k * n + i] * aty[k * m + c];
            }
            aty[i * m + c] = v / ata[i * n + i];
        }
    }
    true
}

/// The non-zero window of the bases at x: (first basis index, values); empty outside the grid.
fn window(x: f64, knots: &[f64], order: usize, scratch: &mut [f64]) -> Option<(usize, usize)> {
    basis_values(x, knots, order, scratch);
    let first = scratch.iter().position(|&v| v != 0.0)?;
    let last = scratch.iter().rposition(|&v| v != 0.0)?;
    Some((first, last + 1))
}

/// efficient-kan's `curve2coeff` for one feature: coefficients (nb x out) of the spline on
/// `knots` that fits `y` (samples x out) at `xs` in the least-squares sense.
pub fn fit_feature(xs: &[f64], y: &[f64], out: usize, knots: &[f64], order: usize) -> Vec<f64> {
    let nb = knots.len() - 1 - order;
    let mut ata = vec![0.0; nb * nb];
    let mut aty = vec![0.0; nb * out];
    let mut row = vec![0.0; nb];
    for (s, &x) in xs.iter().enumerate() {
        if let Some((a, b)) = window(x, knots, order, &mut row) {
            for p in a..b {
                for q in a..b {
                    ata[p * nb + q] += row[p] * row[q];
                }
                for o in 0..out {
                    aty[p * out + o] += row[p] * y[s * out + o];
                }
            }
        }
    }
    if !solve_normal_equations(&mut ata, &mut aty, nb, out) {
        aty.fill(0.0);
    }
    aty
}

/// Uniform in [-bound, bound) with torch's kaiming_uniform_ bound for `a` and `fan_in`.
pub fn kaiming_uniform(rng: &mut Rng, n: usize, a: f64, fan_in: usize) -> Vec<f64> {
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    let bound = gain * (3.0 / fan_in as f64).sqrt();
    (0..n).map(|_| rng.uniform(-bound, bound)).collect()
}

/// Grid update of one feature (efficient-kan `update_grid`): knots from the sorted
/// samples mixed with a uniform grid by `grid_eps`, extended by `order` uniform steps on
/// each side. Returns `grid_size + 2 order + 1` knots (f64, to be rounded to f32).
pub fn updated_knots(sorted: &[f64], grid_size: usize, order: usize, grid_eps: f64, margin: f64) -> Vec<f64> {
    let batch = sorted.len();
    let g = grid_size;
    let (lo, hi) = (sorted[0], sorted[batch - 1]);
    let step = (hi - lo + 2.0 * margin) / g as f64;
    let mut core = Vec::with_capacity(g + 1);
    for q in 0..=g {
        // torch.linspace(0, batch - 1, G + 1, dtype=int64) truncates toward zero.
        let idx = if g == 0 { 0 } else { ((q as f64) * (batch - 1) as f64 / g as f64) as usize };
        let adaptive = sorted[idx.min(batch - 1)];
        let uniform = q as f64 * step + lo - margin;
        core.push(grid_eps * uniform + (1.0 - grid_eps) * adaptive);
    }
    let mut knots = Vec::with_capacity(g + 2 * order + 1);
    for e in (1..=order).rev() {
        knots.push(core[0] - step * e as f64);
    }
    knots.extend_from_slice(&core);
    for e in 1..=order {
        knots.push(core[g] + step * e as f64);
    }
    knots
}

/// efficient-kan's `regularization_loss` from the spline weights (out x in x nb):
/// `activation * sum(l1) + entropy * (-sum(p log p))` with `l1 = mean_j |w|`,
/// `p = l1 / sum(l1)`; terms with p = 0 count as 0 (efficient-kan: 0 log 0 = NaN).
pub fn regularization_loss(spline_weight: &[f64], nb: usize, activation: f64, entropy: f64) -> f64 {
    let l1: Vec<f64> =
        spline_weight.chunks_exact(nb).map(|w| w.iter().map(|v| v.abs()).sum::<f64>() / nb as f64).collect();
    let total: f64 = l1.iter().sum();
    let ent: f64 = if total > 0.0 {
        -l1.iter().map(|&v| v / total).filter(|&p| p > 0.0).map(|p| p * p.ln()).sum::<f64>()
    } else {
        0.0
    };
    activation * total + entropy * ent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_equations_solve_a_known_system() {
        // A = [[1, 2], [3, 4], [5, 6]], X = [[1], [-1]] -> Y = A X exactly.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let y = [-1.0, -1.0, -1.0];
        let mut ata = vec![0.0; 4];
        let mut aty = vec![0.0; 2];
        for r in 0..3 {
            for p in 0..2 {
                for q in 0..2 {
                    ata[p * 2 + q] += a[r * 2 + p] * a[r * 2 + q];
                }
                aty[p] += a[r * 2 + p] * y[r];
            }
        }
        assert!(solve_normal_equations(&mut ata, &mut aty, 2, 1));
        // The ridge term (1e-10 of the mean diagonal) moves this solution by ~2e-8.
        assert!((aty[0] - 1.0).abs() < 1e-6 && (aty[1] + 1.0).abs() < 1e-6, "{aty:?}");
    }

    #[test]
    fn updated_knots_match_efficient_kan_on_uniform_samples() {
        // Samples 0..=10 (batch 11), G = 5, k = 1, eps = 1 (uniform), margin 0.
        let sorted: Vec<f64> = (0..=10).map(f64::from).collect();
        let k = updated_knots(&sorted, 5, 1, 1.0, 0.0);
        assert_eq!(k, vec![-2.0, 0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0]);
        // eps = 0: adaptive knots at indices linspace(0, 10, 6) = 0, 2, 4, 6, 8, 10.
        let k = updated_knots(&sorted, 5, 1, 0.0, 0.0);
        assert_eq!(&k[1..7], &[0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
    }

    #[test]
    fn regularization_matches_the_formula() {
        let w = [1.0, -1.0, 0.0, 0.0, 2.0, 2.0]; // nb = 2: l1 = [1, 0, 2]
        let loss = regularization_loss(&w, 2, 1.0, 1.0);
        let (p1, p3) = (1.0f64 / 3.0, 2.0f64 / 3.0);
        let expect = 3.0 - (p1 * p1.ln() + p3 * p3.ln());
        assert!((loss - expect).abs() < 1e-12);
    }
}
