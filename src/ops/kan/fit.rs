//! Host-side f64 fitting for KANLinear: efficient-kan's initialisation (`reset_parameters`,
//! `curve2coeff`), its grid update (`update_grid`) and `regularization_loss`.
//!
//! Least squares: per input feature, the coefficients X (nb x out) minimise
//! ||A X - Y|| for the basis matrix A (samples x nb). They are solved from the normal
//! equations (A^T A + lambda I) X = A^T Y by a banded Cholesky in f64 (A^T A has bandwidth k). lambda is 1e-10 of the mean
//! diagonal, which leaves well-posed fits unchanged to ~1e-10 and sends coefficients of bases
//! that no sample touches to ~0, as a minimum-norm solution would (torch's `lstsq`).

use crate::ops::bspline::cpu::nonzero_bases;
use crate::rng::Rng;

/// Solves (A^T A + lambda I) X = A^T Y in place for a symmetric banded A^T A: `band`
/// holds its lower band, entry (i, j) for `i - bandwidth <= j <= i` at
/// `band[i * (bandwidth + 1) + (i - j)]`, and is destroyed; `aty` (n x m) becomes X. B-spline
/// bases of order k overlap only their k neighbours, so the bandwidth is k and the cost
/// O(n k^2 + n k m) in time and O(n k) in memory, whatever the grid size. Returns false if
/// the system is not positive definite (only when values are non-finite).
pub fn solve_banded_normal_equations(band: &mut [f64], aty: &mut [f64], n: usize, m: usize, bandwidth: usize) -> bool {
    let w = bandwidth + 1;
    let at = |i: usize, j: usize| i * w + (i - j);
    let trace: f64 = (0..n).map(|i| band[at(i, i)]).sum();
    let lambda = 1e-10 * (trace / n as f64).max(1e-300);
    for i in 0..n {
        band[at(i, i)] += lambda;
    }
    // Cholesky: A = L L^T, L in the band (its zeros outside the band stay zero).
    for j in 0..n {
        let mut d = band[at(j, j)];
        for k in j.saturating_sub(bandwidth)..j {
            d -= band[at(j, k)] * band[at(j, k)];
        }
        if d.is_nan() || d <= 0.0 {
            return false;
        }
        let d = d.sqrt();
        band[at(j, j)] = d;
        for i in j + 1..n.min(j + w) {
            let mut v = band[at(i, j)];
            for k in i.saturating_sub(bandwidth)..j {
                v -= band[at(i, k)] * band[at(j, k)];
            }
            band[at(i, j)] = v / d;
        }
    }
    for c in 0..m {
        // forward: L z = b
        for i in 0..n {
            let mut v = aty[i * m + c];
            for k in i.saturating_sub(bandwidth)..i {
                v -= band[at(i, k)] * aty[k * m + c];
            }
            aty[i * m + c] = v / band[at(i, i)];
        }
        // backward: L^T x = z
        for i in (0..n).rev() {
            let mut v = aty[i * m + c];
            for k in i + 1..n.min(i + w) {
                v -= band[at(k, i)] * aty[k * m + c];
            }
            aty[i * m + c] = v / band[at(i, i)];
        }
    }
    true
}

/// efficient-kan's `curve2coeff` for one feature: coefficients (nb x out) of the spline on
/// `knots` that fits `y` (samples x out) at `xs` in the least-squares sense.
pub fn fit_feature(xs: &[f64], y: &[f64], out: usize, knots: &[f64], order: usize) -> Vec<f64> {
    let nb = knots.len() - 1 - order;
    let w = order + 1;
    let mut ata = vec![0.0; nb * w]; // the lower band of A^T A (a window spans <= order + 1 bases)
    let mut aty = vec![0.0; nb * out];
    for (s, &x) in xs.iter().enumerate() {
        if let Some((first, row)) = nonzero_bases(x, knots, order) {
            for (i, &bp) in row.iter().enumerate() {
                let p = first + i;
                for (j, &bq) in row[..=i].iter().enumerate() {
                    ata[p * w + (i - j)] += bp * bq;
                }
                for o in 0..out {
                    aty[p * out + o] += bp * y[s * out + o];
                }
            }
        }
    }
    if !solve_banded_normal_equations(&mut ata, &mut aty, nb, out, order) {
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
        let mut band = vec![0.0; 4]; // n = 2, bandwidth 1: the whole lower triangle
        let mut aty = vec![0.0; 2];
        for r in 0..3 {
            for p in 0..2 {
                for q in 0..=p {
                    band[p * 2 + (p - q)] += a[r * 2 + p] * a[r * 2 + q];
                }
                aty[p] += a[r * 2 + p] * y[r];
            }
        }
        assert!(solve_banded_normal_equations(&mut band, &mut aty, 2, 1, 1));
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
