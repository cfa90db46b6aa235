//! AdamW: one step against PyTorch's formula, clipping, zeroing, groups and typed errors through
//! the public API (CPU, in CI); on the GPU several steps against the f64 step over odd sizes with
//! NaN-poisoned buffers, and bitwise repeatability.

mod common;

use hybrid_kernels::ops::adamw::check::{adamw_tolerance, AdamWCase};
use hybrid_kernels::ops::adamw::{adamw_step, no_weight_decay, zero_state, AdamWConfig, AdamWParam, ParamGroup};
use hybrid_kernels::{DType, Device, Error, Tensor};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

fn t(v: &[f32]) -> Tensor {
    Tensor::from_f32(v, &[v.len()], DType::F32, &CPU).unwrap()
}

#[test]
fn one_step_matches_torch_adamw() {
    // Step 1 from zero moments: m = (1 - b1) g, v = (1 - b2) g^2, m_hat = g, v_hat = g^2, so
    // p = p (1 - lr wd) - lr g / (|g| + eps).
    let (mut p, mut g) = (t(&[1.0, -2.0, 0.5]), t(&[0.1, -0.3, 0.0]));
    let (mut m, mut v) = zero_state(&p).unwrap();
    let mut copy = Tensor::full(0.0, &[3], DType::BF16, &CPU).unwrap();
    let group = ParamGroup { lr: 0.01, weight_decay: 0.1 };
    let config = AdamWConfig { zero_grad: true, ..Default::default() };
    let mut params =
        [AdamWParam { param: &mut p, grad: &mut g, m: &mut m, v: &mut v, copy: Some(&mut copy), group: 0 }];
    let r = adamw_step(&config, 1, &[group], &mut params).unwrap();
    assert!(r.grad_norm.is_none());
    let want = [1.0 * 0.999 - 0.01 * 0.1 / (0.1 + 1e-8), -2.0 * 0.999 + 0.01 * 0.3 / (0.3 + 1e-8), 0.5 * 0.999];
    for (got, w) in p.to_f64_vec().unwrap().iter().zip(want) {
        assert!((got - w).abs() < 1e-6, "{got} vs {w}");
    }
    assert_eq!(g.to_f64_vec().unwrap(), vec![0.0; 3], "zeroed");
    let c = copy.to_f64_vec().unwrap();
    assert!((c[1] - want[1]).abs() < 1e-2, "bf16 copy {c:?}");
}

#[test]
fn clipping_scales_every_gradient_by_the_global_norm() {
    // Two tensors with global gradient norm 5 (3, 4), clipped to 1: g becomes (0.6, 0.8); at
    // step 1 the update is lr * sign(g) whatever the scale, so compare m instead.
    let (mut p1, mut g1, mut p2, mut g2) = (t(&[0.0]), t(&[3.0]), t(&[0.0]), t(&[4.0]));
    let (mut m1, mut v1) = zero_state(&p1).unwrap();
    let (mut m2, mut v2) = zero_state(&p2).unwrap();
    let groups = [ParamGroup { lr: 0.1, weight_decay: 0.0 }];
    let config = AdamWConfig { max_grad_norm: Some(1.0), ..Default::default() };
    let mut params = [
        AdamWParam { param: &mut p1, grad: &mut g1, m: &mut m1, v: &mut v1, copy: None, group: 0 },
        AdamWParam { param: &mut p2, grad: &mut g2, m: &mut m2, v: &mut v2, copy: None, group: 0 },
    ];
    let r = adamw_step(&config, 1, &groups, &mut params).unwrap();
    assert!((r.grad_norm.unwrap().to_f64_vec().unwrap()[0] - 5.0).abs() < 1e-6);
    let clip = 1.0 / (5.0 + 1e-6);
    assert!((m1.to_f64_vec().unwrap()[0] - 0.1 * 3.0 * clip).abs() < 1e-7);
    assert!((m2.to_f64_vec().unwrap()[0] - 0.1 * 4.0 * clip).abs() < 1e-7);
    assert_eq!(g1.to_f64_vec().unwrap(), vec![3.0], "not zeroed unless asked");
}

#[test]
fn adamw_errors_are_typed() {
    let (mut p, mut g) = (t(&[1.0; 4]), t(&[1.0; 3]));
    let (mut m, mut v) = zero_state(&p).unwrap();
    let group = [ParamGroup { lr: 1e-3, weight_decay: 0.0 }];
    let c = AdamWConfig::default();
    let mut params = [AdamWParam { param: &mut p, grad: &mut g, m: &mut m, v: &mut v, copy: None, group: 0 }];
    assert!(matches!(adamw_step(&c, 1, &group, &mut params), Err(Error::InvalidArgument { arg: "grad", .. })));
    let (mut p, mut g) = (t(&[1.0; 4]), t(&[1.0; 4]));
    let mut params = [AdamWParam { param: &mut p, grad: &mut g, m: &mut m, v: &mut v, copy: None, group: 1 }];
    assert!(matches!(adamw_step(&c, 1, &group, &mut params), Err(Error::InvalidArgument { arg: "group", .. })));
    params[0].group = 0;
    assert!(matches!(adamw_step(&c, 0, &group, &mut params), Err(Error::InvalidArgument { arg: "step", .. })));
    let bad = AdamWConfig { beta2: 1.0, ..c };
    assert!(matches!(adamw_step(&bad, 1, &group, &mut params), Err(Error::InvalidArgument { arg: "beta2", .. })));
    let bad = AdamWConfig { max_grad_norm: Some(f32::NAN), ..c };
    assert!(matches!(
        adamw_step(&bad, 1, &group, &mut params),
        Err(Error::InvalidArgument { arg: "max_grad_norm", .. })
    ));
    let nan_lr = [ParamGroup { lr: f32::NAN, weight_decay: 0.0 }];
    assert!(matches!(adamw_step(&c, 1, &nan_lr, &mut params), Err(Error::InvalidArgument { arg: "groups", .. })));
    let mut half = Tensor::full(0.0, &[4], DType::BF16, &CPU).unwrap();
    let mut params = [AdamWParam { param: &mut half, grad: &mut g, m: &mut m, v: &mut v, copy: None, group: 0 }];
    assert!(matches!(adamw_step(&c, 1, &group, &mut params), Err(Error::DTypeMismatch { arg: "param", .. })));
    assert!(no_weight_decay("layers.0.mixer.A_log", 2) && no_weight_decay("norm.weight", 1));
    assert!(!no_weight_decay("layers.0.mixer.in_proj.weight", 2));
}

#[test]
fn the_cpu_path_passes_its_own_check_cases() {
    for copy in DType::ALL {
        let case = AdamWCase { sizes: vec![3, 17], copy, clip: Some(0.5), zero_grad: true, steps: 2 };
        assert!(case.run(9, &CPU).unwrap() <= adamw_tolerance(copy));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(24), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn adamw_gpu_matches_cpu_reference(
        sizes in proptest::collection::vec(prop_oneof![Just(1usize), Just(4096), Just(4097), 1usize..10_000], 1..8),
        copy in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
        clip in prop_oneof![Just(None), Just(Some(0.1f32)), Just(Some(1e6f32))],
        zero_grad in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let Some(gpu) = common::gpu("adamw_gpu_matches_cpu_reference") else { return Ok(()) };
        let case = AdamWCase { sizes, copy, clip, zero_grad, steps: 3 };
        let err = case.run(seed, &gpu).unwrap();
        prop_assert!(err <= adamw_tolerance(copy), "{case:?}: {err:e}");
    }
}

#[test]
fn adamw_gpu_is_bitwise_repeatable() {
    let Some(gpu) = common::gpu("adamw_gpu_is_bitwise_repeatable") else { return };
    let run = || {
        let sizes = [1_000_003usize, 4096, 77];
        let mut out = Vec::new();
        let mut state: Vec<[Tensor; 4]> = sizes
            .iter()
            .map(|&n| {
                let w: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
                let g: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 1000) as f32 / 500.0 - 1.0).collect();
                let f = |v: &[f32]| Tensor::from_f32(v, &[n], DType::F32, &gpu).unwrap();
                [
                    f(&w),
                    f(&g),
                    Tensor::full(0.0, &[n], DType::F32, &gpu).unwrap(),
                    Tensor::full(0.0, &[n], DType::F32, &gpu).unwrap(),
                ]
            })
            .collect();
        let mut params: Vec<AdamWParam> =
            state.iter_mut().map(|[w, g, m, v]| AdamWParam { param: w, grad: g, m, v, copy: None, group: 0 }).collect();
        let groups = [ParamGroup { lr: 1e-3, weight_decay: 0.1 }];
        let c = AdamWConfig { max_grad_norm: Some(1.0), ..Default::default() };
        let r = adamw_step(&c, 1, &groups, &mut params).unwrap();
        out.push(r.grad_norm.unwrap().to_vec::<f32>().unwrap());
        for p in &params {
            out.push(p.param.to_vec::<f32>().unwrap());
        }
        out
    };
    let first = run();
    assert_eq!(first, run());
}
