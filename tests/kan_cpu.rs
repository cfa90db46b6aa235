//! KANLinear on the CPU (run in CI): the f64 reference's backward against finite
//! differences, efficient-kan's initialisation, grid update, regularization, and the
//! typed errors of the API.

use hybrid_kernels::check::{relative_error, Rng};
use hybrid_kernels::ops::kan::{cpu, fit, KanLinear, KanLinearConfig};
use hybrid_kernels::{DType, Device, Error, Tensor};
use proptest::prelude::*;

fn random_layer(seed: u64, inf: usize, outf: usize, g: usize, k: usize, scaler: bool) -> KanLinear {
    let mut c = KanLinearConfig::new(inf, outf);
    c.grid_size = g;
    c.spline_order = k;
    c.standalone_scale_spline = scaler;
    c.scale_noise = 1.0; // spline weights of order one, so the spline branch matters
    KanLinear::new(c, DType::F32, &Device::Cpu, seed).unwrap()
}

fn random_x(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n).map(|_| rng.uniform(lo, hi) as f32).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// d/dθ sum(y * dy) by central differences against the analytic backward, for x,
    /// W_base, W_spline and the scaler. Inputs stay away from knots, where bases of
    /// order <= 1 have kinks.
    #[test]
    fn backward_matches_finite_differences(seed in any::<u64>(), batch in 1usize..4, inf in 1usize..4, outf in 1usize..4,
                                           g in 1usize..6, k in 1usize..4, scaler in any::<bool>()) {
        let layer = random_layer(seed, inf, outf, g, k, scaler);
        let p = layer.params64().unwrap();
        let mut rng = Rng::new(seed ^ 1);
        let x: Vec<f64> = (0..batch * inf).map(|_| {
            loop {
                let v = rng.uniform(-1.6, 1.6);
                let near = p.knots.iter().any(|t| (t - v).abs() < 1e-3);
                if !near { break v; }
            }
        }).collect();
        let dy: Vec<f64> = (0..batch * outf).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let g64 = cpu::backward(&p, &x, &dy);
        let loss = |p: &cpu::Params64, x: &[f64]| cpu::forward(p, x).iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>();
        let h = 1e-6;
        let check = |analytic: f64, plus: f64, minus: f64, what: &str| {
            let fd = (plus - minus) / (2.0 * h);
            assert!((fd - analytic).abs() <= 1e-6 * (1.0 + fd.abs()), "{what}: fd {fd} analytic {analytic}");
        };
        for r in 0..x.len() {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[r] += h;
            xm[r] -= h;
            check(g64.dx[r], loss(&p, &xp), loss(&p, &xm), "dx");
        }
        for idx in 0..p.base_weight.len() {
            let (mut pp, mut pm) = (layer.params64().unwrap(), layer.params64().unwrap());
            pp.base_weight[idx] += h;
            pm.base_weight[idx] -= h;
            check(g64.base_weight[idx], loss(&pp, &x), loss(&pm, &x), "dW_base");
        }
        for idx in 0..p.spline_weight.len() {
            let (mut pp, mut pm) = (layer.params64().unwrap(), layer.params64().unwrap());
            pp.spline_weight[idx] += h;
            pm.spline_weight[idx] -= h;
            check(g64.spline_weight[idx], loss(&pp, &x), loss(&pm, &x), "dW_spline");
        }
        if let Some(ds) = &g64.spline_scaler {
            for (idx, &d) in ds.iter().enumerate() {
                let (mut pp, mut pm) = (layer.params64().unwrap(), layer.params64().unwrap());
                pp.spline_scaler.as_mut().unwrap()[idx] += h;
                pm.spline_scaler.as_mut().unwrap()[idx] -= h;
                check(d, loss(&pp, &x), loss(&pm, &x), "dscaler");
            }
        }
    }
}

#[test]
fn initialisation_follows_efficient_kan() {
    let mut c = KanLinearConfig::new(16, 8);
    c.standalone_scale_spline = false;
    c.scale_spline = 1.0;
    let a = KanLinear::new(c.clone(), DType::F32, &Device::Cpu, 42).unwrap();
    let b = KanLinear::new(c.clone(), DType::F32, &Device::Cpu, 42).unwrap();
    let other = KanLinear::new(c.clone(), DType::F32, &Device::Cpu, 43).unwrap();
    // Seeded: the same seed gives the same layer, another seed another.
    assert_eq!(a.spline_weight().to_f32_vec().unwrap(), b.spline_weight().to_f32_vec().unwrap());
    assert_ne!(a.base_weight().to_f32_vec().unwrap(), other.base_weight().to_f32_vec().unwrap());
    // kaiming_uniform(a = sqrt(5)): bound = sqrt(6 / ((1 + 5) fan_in)) = 1 / sqrt(in)
    let bound = 1.0 / (16f32).sqrt();
    let wb = a.base_weight().to_f32_vec().unwrap();
    assert!(wb.iter().all(|v| v.abs() <= bound) && wb.iter().any(|v| v.abs() > 0.8 * bound));
    // The spline branch alone interpolates uniform noise of amplitude scale_noise / (2 G)
    // at the G + 1 interior knots, so it stays within that amplitude there.
    let p = a.params64().unwrap();
    let knots = &p.knots[..p.n_knots];
    let amp = c.scale_noise / 2.0 / c.grid_size as f64;
    let mut only_spline = a.params64().unwrap();
    only_spline.base_weight.fill(0.0);
    for &t in &knots[c.spline_order..c.spline_order + c.grid_size] {
        let x = vec![t; 16];
        for y in cpu::forward(&only_spline, &x) {
            assert!(y.abs() <= 16.0 * amp * 1.0001, "{y}");
        }
    }
}

#[test]
fn init_spline_interpolates_its_noise() {
    // One feature, one output: the fitted spline passes through the noise samples.
    let (g, k) = (5usize, 3usize);
    let h = 2.0 / g as f64;
    let knots: Vec<f64> = (-(k as i64)..=(g + k) as i64).map(|i| -1.0 + i as f64 * h).collect();
    let points: Vec<f64> = knots[k..=k + g].to_vec();
    let mut rng = Rng::new(5);
    let y: Vec<f64> = (0..=g).map(|_| rng.uniform(-0.05, 0.05)).collect();
    let coeff = fit::fit_feature(&points, &y, 1, &knots, k);
    let mut b = vec![0.0; g + k];
    for (q, &x) in points.iter().enumerate().take(g) {
        hybrid_kernels::ops::bspline::cpu::basis_values(x, &knots, k, &mut b);
        let v: f64 = b.iter().zip(&coeff).map(|(a, c)| a * c).sum();
        assert!((v - y[q]).abs() < 1e-9, "point {q}: {v} vs {}", y[q]);
    }
}

#[test]
fn update_grid_preserves_the_output() {
    for scaler in [true, false] {
        let mut layer = random_layer(9, 6, 5, 5, 3, scaler);
        let mut rng = Rng::new(3);
        // Samples spread over most of the grid range: the new grid is close to the old one.
        let x = Tensor::from_vec(random_x(&mut rng, 512 * 6, -0.98, 0.98), &[512, 6], &Device::Cpu).unwrap();
        let before = layer.forward(&x).unwrap().to_f64_vec().unwrap();
        let old_knots = layer.grid().knots().to_f32_vec().unwrap();
        layer.update_grid(&x, 0.01).unwrap();
        let after = layer.forward(&x).unwrap().to_f64_vec().unwrap();
        assert_ne!(old_knots, layer.grid().knots().to_f32_vec().unwrap(), "the grid moved");
        let err = relative_error(&after, &before);
        assert!(err < 2e-2, "scaler {scaler}: relative change of the output {err:e}");
    }
}

#[test]
fn update_grid_with_the_same_spline_space_is_exact() {
    // Samples whose min/max give back the original uniform grid (grid_eps = 1, margin 0):
    // the refit must reproduce the output to rounding.
    let mut c = KanLinearConfig::new(3, 4);
    c.grid_eps = 1.0;
    c.scale_noise = 1.0;
    let mut layer = KanLinear::new(c, DType::F32, &Device::Cpu, 11).unwrap();
    let mut rng = Rng::new(8);
    let mut x = random_x(&mut rng, 300 * 3, -1.0, 1.0);
    x[..3].fill(-1.0); // the sample range is exactly [-1, 1]
    x[3..6].fill(1.0);
    let x = Tensor::from_vec(x, &[300, 3], &Device::Cpu).unwrap();
    let before = layer.forward(&x).unwrap().to_f64_vec().unwrap();
    let old = layer.grid().knots().to_f32_vec().unwrap();
    layer.update_grid(&x, 0.0).unwrap();
    assert_eq!(old, layer.grid().knots().to_f32_vec().unwrap());
    let after = layer.forward(&x).unwrap().to_f64_vec().unwrap();
    let err = relative_error(&after, &before);
    assert!(err < 1e-6, "{err:e}");
}

#[test]
fn regularization_loss_matches_a_direct_computation() {
    let layer = random_layer(4, 3, 2, 4, 2, true);
    let w = layer.spline_weight().to_f64_vec().unwrap();
    let nb = 6;
    let l1: Vec<f64> = w.chunks(nb).map(|c| c.iter().map(|v| v.abs()).sum::<f64>() / nb as f64).collect();
    let s: f64 = l1.iter().sum();
    let ent: f64 = -l1.iter().map(|v| (v / s) * (v / s).ln()).sum::<f64>();
    let got = layer.regularization_loss(0.5, 2.0).unwrap();
    assert!((got - (0.5 * s + 2.0 * ent)).abs() < 1e-5 * got.abs(), "{got}");
}

#[test]
fn leading_dimensions_flatten() {
    let layer = random_layer(1, 4, 3, 5, 3, true);
    let mut rng = Rng::new(2);
    let x3 = Tensor::from_vec(random_x(&mut rng, 2 * 5 * 4, -1.0, 1.0), &[2, 5, 4], &Device::Cpu).unwrap();
    let y3 = layer.forward(&x3).unwrap();
    assert_eq!(y3.shape(), &[2, 5, 3]);
    let y2 = layer.forward(&x3.clone().reshape(&[10, 4]).unwrap()).unwrap();
    assert_eq!(y3.to_f32_vec().unwrap(), y2.to_f32_vec().unwrap());
    let g = layer.backward(&x3, &Tensor::full(1.0, &[2, 5, 3], DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(g.dx.shape(), &[2, 5, 4]);
}

#[test]
fn bad_arguments_are_typed_errors() {
    let cpu = Device::Cpu;
    let layer = random_layer(1, 4, 3, 5, 3, true);
    let arg_of = |e: Error| match e {
        Error::InvalidArgument { arg, .. } | Error::DTypeMismatch { arg, .. } | Error::DeviceMismatch { arg, .. } => {
            arg
        }
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(arg_of(layer.forward(&Tensor::full(0.0, &[2, 5], DType::F32, &cpu).unwrap()).unwrap_err()), "x");
    assert_eq!(arg_of(layer.forward(&Tensor::full(0.0, &[2, 4], DType::BF16, &cpu).unwrap()).unwrap_err()), "x");
    let x = Tensor::full(0.0, &[2, 4], DType::F32, &cpu).unwrap();
    assert_eq!(arg_of(layer.backward(&x, &Tensor::full(0.0, &[2, 4], DType::F32, &cpu).unwrap()).unwrap_err()), "dy");
    let mut c = KanLinearConfig::new(4, 3);
    c.grid_eps = 2.0;
    assert_eq!(arg_of(KanLinear::new(c, DType::F32, &cpu, 0).unwrap_err()), "grid_eps");
    let mut c = KanLinearConfig::new(4, 3);
    c.spline_order = 9;
    assert_eq!(arg_of(KanLinear::new(c, DType::F32, &cpu, 0).unwrap_err()), "spline_order");
    assert_eq!(arg_of(KanLinear::new(KanLinearConfig::new(0, 3), DType::F32, &cpu, 0).unwrap_err()), "in_features");
    // Parameters that do not fit the configuration.
    let cfg = layer.config().clone();
    let wrong = Tensor::full(0.0, &[3, 5], DType::F32, &cpu).unwrap();
    let r = KanLinear::from_parameters(
        cfg.clone(),
        layer.grid().clone(),
        wrong,
        layer.spline_weight().clone(),
        layer.spline_scaler().cloned(),
    );
    assert_eq!(arg_of(r.unwrap_err()), "base_weight");
    let r = KanLinear::from_parameters(
        cfg,
        layer.grid().clone(),
        layer.base_weight().clone(),
        layer.spline_weight().clone(),
        None,
    );
    assert_eq!(arg_of(r.unwrap_err()), "spline_scaler");
    // update_grid refuses non-finite samples.
    let mut l = layer.clone();
    let bad = Tensor::from_vec(vec![0.0f32, f32::NAN, 0.0, 0.0], &[1, 4], &cpu).unwrap();
    assert!(matches!(l.update_grid(&bad, 0.01), Err(Error::NonFinite { arg: "x", index: 1, .. })));
}
