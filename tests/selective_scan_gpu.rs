//! The selective scan on the GPU against the f64 reference: output, last state and every
//! gradient, on random shapes (odd sizes, L = 1, L past several tiles and past 2048, dstate
//! up to 256, grouped B / C), every dtype, with and without z, D, bias, softplus, h0,
//! resets, a last-state gradient and forward checkpoints; large |dt A|; bitwise
//! reproducibility of the backward. Skips without a GPU unless
//! HYBRID_KERNELS_REQUIRE_GPU=1; HYBRID_KERNELS_POISON=1 NaN-fills every output first.

mod common;

use hybrid_kernels::check::{scan_tolerance, Rng, ScanCase};
use hybrid_kernels::ops::selective_scan::{selective_scan_backward, selective_scan_for_backward};
use hybrid_kernels::{DType, Tensor};
use proptest::prelude::*;

fn assert_within(case: &ScanCase, errs: &[(&'static str, f64)]) {
    let tol = scan_tolerance(case.dtype);
    for (n, e) in errs {
        assert!(*e <= tol, "{n}: relative error {e:e} > {tol:e} in {case:?}\nall: {errs:?}");
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)
}

fn full_case(batch: usize, dim: usize, dstate: usize, len: usize, groups: usize, dtype: DType) -> ScanCase {
    ScanCase {
        batch,
        dim,
        dstate,
        len,
        groups,
        b_variable: true,
        c_variable: true,
        with_d: true,
        with_z: true,
        with_bias: true,
        softplus: true,
        with_h0: true,
        with_resets: false,
        with_dlast: true,
        checkpoints: true,
        a_max: 16.0,
        dtype,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn scan_gpu_matches_cpu_reference(
        seed in any::<u64>(),
        batch in prop_oneof![Just(1usize), 1usize..4],
        dpg in prop_oneof![Just(1usize), Just(7), Just(33), Just(40), 1usize..70],
        groups in prop_oneof![Just(1usize), 1usize..4],
        dstate in prop_oneof![Just(1usize), Just(4), Just(16), Just(17), Just(33), Just(64), Just(100), Just(128), Just(256)],
        len in prop_oneof![Just(1usize), Just(7), Just(33), Just(64), Just(257), Just(1025), 1usize..200],
        flags in 0u32..1024,
        dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
    ) {
        let Some(gpu) = common::gpu("scan_gpu_matches_cpu_reference") else { return Ok(()) };
        // Keep the reference's cost bounded: the big state sizes with shorter sequences.
        let len = if dstate >= 64 { len.min(300) } else { len };
        let case = ScanCase::from_option_bits(batch, dpg * groups, dstate, len, groups, flags, dtype);
        assert_within(&case, &case.run(seed, &gpu).unwrap());
    }
}

#[test]
fn scan_past_2048_steps_and_many_tiles() {
    let Some(gpu) = common::gpu("scan_past_2048_steps_and_many_tiles") else { return };
    for (dtype, len, dstate) in [(DType::F32, 4100, 16), (DType::BF16, 2049, 16), (DType::F16, 3001, 64)] {
        for resets in [false, true] {
            let case = ScanCase { with_resets: resets, ..full_case(2, 66, dstate, len, 2, dtype) };
            assert_within(&case, &case.run(7, &gpu).unwrap());
        }
    }
}

/// |dt A| up to ~1000: exp(dt A) underflows to 0 and must not produce NaN or Inf.
#[test]
fn scan_is_stable_for_large_dt_a() {
    let Some(gpu) = common::gpu("scan_is_stable_for_large_dt_a") else { return };
    for dtype in [DType::F32, DType::BF16] {
        let case = ScanCase { a_max: 1000.0, ..full_case(2, 35, 16, 500, 1, dtype) };
        assert_within(&case, &case.run(3, &gpu).unwrap());
    }
}

#[test]
fn scan_with_constant_b_and_c_and_no_options() {
    let Some(gpu) = common::gpu("scan_with_constant_b_and_c_and_no_options") else { return };
    for (bv, cv) in [(false, false), (true, false), (false, true)] {
        let case = ScanCase {
            b_variable: bv,
            c_variable: cv,
            with_d: false,
            with_z: false,
            with_bias: false,
            softplus: false,
            with_h0: false,
            with_dlast: false,
            ..full_case(3, 48, 16, 300, 1, DType::F32)
        };
        assert_within(&case, &case.run(9, &gpu).unwrap());
    }
}

/// Two backward runs, and a run that recomputes the checkpoints, agree bit for bit.
#[test]
fn scan_backward_is_bitwise_repeatable() {
    let Some(gpu) = common::gpu("scan_backward_is_bitwise_repeatable") else { return };
    let case = ScanCase { with_resets: true, ..full_case(2, 130, 16, 700, 2, DType::BF16) };
    let mut rng = Rng::new(21);
    let t = case.tensors(&mut rng).unwrap().to_device(&gpu).unwrap();
    let dout = Tensor::full(0.5, &[2, 130, 700], DType::BF16, &gpu).unwrap();
    let (_, ckpt) = selective_scan_for_backward(&t.inputs()).unwrap();
    let runs: Vec<Vec<Vec<f64>>> = (0..3)
        .map(|i| {
            let g = selective_scan_backward(&t.inputs(), &dout, None, (i != 2).then_some(&ckpt)).unwrap();
            [Some(g.du), Some(g.ddelta), Some(g.da), Some(g.db), Some(g.dc), g.dd, g.dz, g.ddelta_bias, g.dh0]
                .into_iter()
                .map(|t| t.unwrap().to_f64_vec().unwrap())
                .collect()
        })
        .collect();
    for (i, r) in runs.iter().enumerate().skip(1) {
        for (k, (a, b)) in runs[0].iter().zip(r).enumerate() {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "run {i}, gradient {k} differs");
        }
    }
}

/// The decode step reproduces the scan token by token, for every dtype and B / C layout.
#[test]
fn decode_step_reproduces_the_scan() {
    let Some(gpu) = common::gpu("decode_step_reproduces_the_scan") else { return };
    for (dtype, dstate, bv, cv, groups) in [
        (DType::F32, 16, true, true, 2),
        (DType::BF16, 16, true, false, 1),
        (DType::F16, 64, false, true, 1),
        (DType::F32, 5, false, false, 1),
        // The ends of the lanes-per-row layout: 2 lanes (8 states) and a whole warp (128).
        (DType::F32, 8, true, true, 2),
        (DType::BF16, 128, true, true, 1),
    ] {
        let case = ScanCase { b_variable: bv, c_variable: cv, ..full_case(3, 34, dstate, 40, groups, dtype) };
        let (out, state) = hybrid_kernels::check::decode_against_scan(&case, 17, &gpu).unwrap();
        let tol = scan_tolerance(dtype);
        assert!(out <= tol && state <= tol, "{case:?}: outputs {out:e}, state {state:e} (tolerance {tol:e})");
    }
}
