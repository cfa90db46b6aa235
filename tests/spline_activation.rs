//! The B-spline activation: the f64 reference against finite differences and its SiLU
//! initialisation (CPU, run in CI), and the GPU against the reference (skips without a GPU
//! unless HYBRID_KERNELS_REQUIRE_GPU=1).

mod common;

use hybrid_kernels::check::{kan_tolerance, relative_error, scaled_error, Rng};
use hybrid_kernels::ops::bspline::KnotGrid;
use hybrid_kernels::ops::spline_activation::{cpu, SplineActivation};
use hybrid_kernels::{DType, Device, Error, Tensor};
use proptest::prelude::*;

/// An activation with random coefficients and base weights (so every term matters).
fn random_activation(
    seed: u64,
    channels: usize,
    g: usize,
    k: usize,
    with_base: bool,
    dtype: DType,
) -> SplineActivation {
    let mut rng = Rng::new(seed);
    let grid = KnotGrid::uniform(channels, g, k, (-1.0, 1.0), &Device::Cpu).unwrap();
    let nb = grid.n_bases();
    let coeff: Vec<f32> = (0..channels * nb).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
    let coeff = Tensor::from_f32(&coeff, &[channels, nb], dtype, &Device::Cpu).unwrap();
    let base = with_base.then(|| {
        let w: Vec<f32> = (0..channels).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        Tensor::from_f32(&w, &[channels], dtype, &Device::Cpu).unwrap()
    });
    SplineActivation::from_parameters(grid, coeff, base).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn reference_backward_matches_finite_differences(seed in any::<u64>(), rows in 1usize..5, channels in 1usize..5,
                                                     g in 1usize..8, k in 1usize..4, with_base in any::<bool>()) {
        let act = random_activation(seed, channels, g, k, with_base, DType::F32);
        let p = act.params64().unwrap();
        let mut rng = Rng::new(seed ^ 7);
        let x: Vec<f64> = (0..rows * channels).map(|_| loop {
            let v = rng.uniform(-2.0, 2.0);
            if p.knots.iter().all(|t| (t - v).abs() > 1e-3) { break v; }
        }).collect();
        let dy: Vec<f64> = (0..x.len()).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let (dx, dc, dw) = cpu::backward(&p, &x, &dy);
        let loss = |p: &cpu::ActParams64, x: &[f64]| cpu::forward(p, x).iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>();
        let h = 1e-6;
        let close = |a: f64, fd: f64| (a - fd).abs() <= 1e-6 * (1.0 + fd.abs());
        for e in 0..x.len() {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[e] += h;
            xm[e] -= h;
            let fd = (loss(&p, &xp) - loss(&p, &xm)) / (2.0 * h);
            prop_assert!(close(dx[e], fd), "dx[{}]: {} vs {}", e, dx[e], fd);
        }
        for (i, &d) in dc.iter().enumerate() {
            let (mut pp, mut pm) = (act.params64().unwrap(), act.params64().unwrap());
            pp.coeff[i] += h;
            pm.coeff[i] -= h;
            let fd = (loss(&pp, &x) - loss(&pm, &x)) / (2.0 * h);
            prop_assert!(close(d, fd), "dcoeff[{}]: {} vs {}", i, d, fd);
        }
        if let Some(dw) = dw {
            for (c, &d) in dw.iter().enumerate() {
                let (mut pp, mut pm) = (act.params64().unwrap(), act.params64().unwrap());
                pp.base_weight.as_mut().unwrap()[c] += h;
                pm.base_weight.as_mut().unwrap()[c] -= h;
                let fd = (loss(&pp, &x) - loss(&pm, &x)) / (2.0 * h);
                prop_assert!(close(d, fd), "dw[{}]: {} vs {}", c, d, fd);
            }
        }
    }
}

#[test]
fn initialised_to_silu() {
    let xs: Vec<f32> = (0..200).map(|i| -0.99 + 1.98 * i as f32 / 199.0).collect();
    let silu: Vec<f64> = xs.iter().map(|&x| x as f64 / (1.0 + (-(x as f64)).exp())).collect();
    for with_base in [false, true] {
        let act = SplineActivation::new(1, 8, 3, (-1.0, 1.0), with_base, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::from_vec(xs.clone(), &[200, 1], &Device::Cpu).unwrap();
        let y = act.forward(&x).unwrap().to_f64_vec().unwrap();
        let err = relative_error(&y, &silu);
        assert!(err < 1e-3, "with_base {with_base}: {err:e}");
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    let act = random_activation(1, 4, 5, 3, true, DType::F32);
    let wrong = Tensor::full(0.0, &[2, 5], DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(act.forward(&wrong), Err(Error::InvalidArgument { arg: "x", .. })));
    let x = Tensor::full(0.0, &[2, 4], DType::F32, &Device::Cpu).unwrap();
    let dy = Tensor::full(0.0, &[3, 4], DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(act.backward(&x, &dy), Err(Error::InvalidArgument { arg: "dy", .. })));
    let bf = Tensor::full(0.0, &[2, 4], DType::BF16, &Device::Cpu).unwrap();
    assert!(matches!(act.forward(&bf), Err(Error::DTypeMismatch { arg: "x", .. })));
    let grid = KnotGrid::uniform(4, 5, 3, (-1.0, 1.0), &Device::Cpu).unwrap();
    let coeff = Tensor::full(0.0, &[4, 7], DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        SplineActivation::from_parameters(grid, coeff, None),
        Err(Error::InvalidArgument { arg: "coeff", .. })
    ));
}

struct Case {
    rows: usize,
    channels: usize,
    g: usize,
    k: usize,
    with_base: bool,
    dtype: DType,
}

fn gpu_case(seed: u64, case: &Case, gpu: &Device) -> [f64; 4] {
    let Case { rows, channels, g, k, with_base, dtype } = *case;
    let act_host = random_activation(seed, channels, g, k, with_base, dtype);
    let act = act_host.to_device(gpu).unwrap();
    let mut rng = Rng::new(seed ^ 0x55);
    let x: Vec<f32> = (0..rows * channels)
        .map(|_| if rng.below(10) == 0 { rng.uniform(-5.0, 5.0) } else { rng.uniform(-1.5, 1.5) } as f32)
        .collect();
    let dy: Vec<f32> = (0..x.len()).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
    let xt = Tensor::from_f32(&x, &[rows, channels], dtype, gpu).unwrap();
    let dyt = Tensor::from_f32(&dy, &[rows, channels], dtype, gpu).unwrap();
    let p = act_host.params64().unwrap();
    let (x64, dy64) = (xt.to_f64_vec().unwrap(), dyt.to_f64_vec().unwrap());
    let y_ref = cpu::forward(&p, &x64);
    let (dx_ref, dc_ref, dw_ref) = cpu::backward(&p, &x64, &dy64);
    let (y_mag, dx_mag, dc_mag, dw_mag) = cpu::magnitudes(&p, &x64, &dy64);
    let y = act.forward(&xt).unwrap().to_f64_vec().unwrap();
    let g = act.backward(&xt, &dyt).unwrap();
    let dw_err = match (&g.base_weight, &dw_ref, &dw_mag) {
        (Some(a), Some(b), Some(m)) => scaled_error(&a.to_f64_vec().unwrap(), b, m),
        (None, None, None) => 0.0,
        _ => f64::INFINITY,
    };
    [
        scaled_error(&y, &y_ref, &y_mag),
        scaled_error(&g.dx.to_f64_vec().unwrap(), &dx_ref, &dx_mag),
        scaled_error(&g.coeff.to_f64_vec().unwrap(), &dc_ref, &dc_mag),
        dw_err,
    ]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn activation_gpu_matches_cpu_reference(
        seed in any::<u64>(),
        rows in prop_oneof![Just(1usize), Just(7), Just(33), Just(1025), 1usize..200],
        channels in prop_oneof![Just(1usize), Just(7), Just(33), 1usize..70],
        g in prop_oneof![Just(1usize), Just(3), Just(5), Just(20), Just(100)],
        k in 1usize..=3,
        with_base in any::<bool>(),
        dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
    ) {
        let Some(gpu) = common::gpu("activation_gpu_matches_cpu_reference") else { return Ok(()) };
        let errs = gpu_case(seed, &Case { rows, channels, g, k, with_base, dtype }, &gpu);
        let tol = kan_tolerance(dtype, false);
        for (name, e) in ["y", "dx", "dcoeff", "dw"].iter().zip(errs) {
            prop_assert!(e <= tol, "{}: {:e} > {:e} (rows {} C {} G {} k {} base {} {})", name, e, tol, rows, channels, g, k, with_base, dtype);
        }
    }
}

#[test]
fn activation_parameter_gradients_are_reproducible() {
    let Some(gpu) = common::gpu("activation_parameter_gradients_are_reproducible") else { return };
    let act = random_activation(3, 64, 5, 3, true, DType::F32).to_device(&gpu).unwrap();
    let mut rng = Rng::new(9);
    let x: Vec<f32> = (0..4099 * 64).map(|_| rng.uniform(-1.2, 1.2) as f32).collect();
    let dy: Vec<f32> = (0..x.len()).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
    let xt = Tensor::from_vec(x, &[4099, 64], &gpu).unwrap();
    let dyt = Tensor::from_vec(dy, &[4099, 64], &gpu).unwrap();
    let first = act.backward(&xt, &dyt).unwrap();
    for _ in 0..3 {
        let again = act.backward(&xt, &dyt).unwrap();
        let bits = |t: &Tensor| t.to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&first.coeff), bits(&again.coeff));
        assert_eq!(bits(first.base_weight.as_ref().unwrap()), bits(again.base_weight.as_ref().unwrap()));
    }
}
