//! f64 reference for the cross-entropy, also its CPU backend.

use super::CrossEntropyOptions;

/// Everything the op returns, in f64.
pub struct CrossEntropyRef {
    pub losses: Vec<f64>,
    pub dlogits: Vec<f64>,
    pub mean: f64,
    pub correct: usize,
}

/// Losses, gradient of the mean (times `grad_scale`) and hits for rows of `vocab` logits.
pub fn cross_entropy(logits: &[f64], targets: &[i32], vocab: usize, opts: &CrossEntropyOptions) -> CrossEntropyRef {
    let valid = targets.iter().filter(|&&t| Some(t) != opts.ignore_index).count();
    let scale = f64::from(opts.grad_scale) / valid.max(1) as f64;
    let cap = opts.softcap.map(f64::from);
    let value = |x: f64| cap.map_or(x, |c| c * (x / c).tanh());
    let mut losses = Vec::with_capacity(targets.len());
    let mut dlogits = Vec::with_capacity(logits.len());
    let mut correct = 0;
    for (row, &target) in logits.chunks_exact(vocab).zip(targets) {
        if Some(target) == opts.ignore_index {
            losses.push(0.0);
            dlogits.extend(std::iter::repeat_n(0.0, vocab));
            continue;
        }
        let v: Vec<f64> = row.iter().map(|&x| value(x)).collect();
        let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = v.iter().map(|&z| (z - m).exp()).sum();
        let t = target as usize;
        losses.push(sum.ln() + m - v[t]);
        // argmax of the raw logits, first occurrence.
        let best = row.iter().enumerate().fold(0, |b, (i, &x)| if x > row[b] { i } else { b });
        correct += usize::from(best == t);
        for (i, &z) in v.iter().enumerate() {
            let p = (z - m).exp() / sum - if i == t { 1.0 } else { 0.0 };
            let dv = cap.map_or(1.0, |c| 1.0 - (z / c) * (z / c));
            dlogits.push(p * scale * dv);
        }
    }
    let mean = losses.iter().sum::<f64>() / valid.max(1) as f64;
    CrossEntropyRef { losses, dlogits, mean, correct }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gradient_is_the_derivative_of_the_mean_loss() {
        let logits = [0.3, -1.2, 2.0, 0.7, -0.1, 0.05, 1.4, -0.6, 0.9, 0.2, -0.8, 1.1];
        let targets = [2, -100, 0];
        for softcap in [None, Some(1.5f32)] {
            let opts = CrossEntropyOptions { softcap, grad_scale: 0.5, ..Default::default() };
            let r = cross_entropy(&logits, &targets, 4, &opts);
            assert_eq!(r.losses[1], 0.0);
            let h = 1e-6;
            for e in 0..logits.len() {
                let (mut p, mut m) = (logits, logits);
                p[e] += h;
                m[e] -= h;
                let fd = 0.5
                    * (cross_entropy(&p, &targets, 4, &opts).mean - cross_entropy(&m, &targets, 4, &opts).mean)
                    / (2.0 * h);
                assert!((fd - r.dlogits[e]).abs() < 1e-8, "{softcap:?} [{e}]: {fd} vs {}", r.dlogits[e]);
            }
        }
    }
}
