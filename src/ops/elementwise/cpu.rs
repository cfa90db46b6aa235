//! f64 reference for the elementwise ops, also their CPU backend.

use super::Activation;

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044715;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `act(x)`.
pub fn act(a: Activation, x: f64) -> f64 {
    match a {
        Activation::Silu => x * sigmoid(x),
        Activation::GeluTanh => 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh()),
        Activation::GeluErf => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
    }
}

/// `act'(x)`.
pub fn act_grad(a: Activation, x: f64) -> f64 {
    match a {
        Activation::Silu => {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        }
        Activation::GeluTanh => {
            let t = (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x)
        }
        Activation::GeluErf => {
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2)) + x * pdf
        }
    }
}

/// `(dgate, dup)` of `sum(dy * act(gate) * up)`.
pub fn gated_backward(gate: &[f64], up: &[f64], dy: &[f64], a: Activation) -> (Vec<f64>, Vec<f64>) {
    let dgate = gate.iter().zip(up).zip(dy).map(|((&g, &u), &d)| d * u * act_grad(a, g)).collect();
    let dup = gate.iter().zip(dy).map(|(&g, &d)| d * act(a, g)).collect();
    (dgate, dup)
}

/// The error function to about 1e-15 (the standard library's is not stable): its Maclaurin
/// series below |x| = 3 (terms peak near 170 there: cancellation costs up to ~3e-14),
/// the continued fraction of erfc above it, and ±1 past 6 (erfc(6) < 3e-17).
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let value = if a < 3.0 {
        // erf(a) = 2/sqrt(pi) sum_n (-1)^n a^(2n+1) / (n! (2n+1))
        let (mut term, mut sum, a2) = (a, a, a * a);
        for n in 1..200 {
            term *= -a2 / n as f64;
            let next = term / (2 * n + 1) as f64;
            sum += next;
            if next.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else if a < 6.0 {
        // erfc(a) = exp(-a^2)/sqrt(pi) / (a + (1/2)/(a + 1/(a + (3/2)/(a + 2/(a + ...)))))
        let mut frac = a;
        for k in (1..80).rev() {
            frac = a + (k as f64 / 2.0) / frac;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / frac
    } else {
        1.0
    };
    value.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // erf at 0.5, 1, 2, 3.5 and 5 (Abramowitz & Stegun table 7.1 and higher-precision tables).
        for (x, want) in [
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.5, 0.999_999_256_901_627_7),
            (5.0, 0.999_999_999_998_462_5),
        ] {
            assert!((erf(x) - want).abs() < 1e-15, "erf({x}) = {} vs {want}", erf(x));
            assert!((erf(-x) + want).abs() < 1e-15);
        }
        assert_eq!(erf(0.0), 0.0);
        // Continuous across the switch from series to continued fraction.
        assert!((erf(3.0 - 1e-12) - erf(3.0 + 1e-12)).abs() < 1e-13);
    }

    #[test]
    fn the_gradients_are_derivatives() {
        for a in Activation::ALL {
            for &x in &[-6.0, -2.5, -0.75, -0.1, 0.0, 0.3, 1.0, 3.7, 8.0] {
                let h = 1e-6;
                let fd = (act(a, x + h) - act(a, x - h)) / (2.0 * h);
                assert!((fd - act_grad(a, x)).abs() < 1e-8, "{a:?} at {x}: {fd} vs {}", act_grad(a, x));
            }
        }
    }
}
