//! CPU-only properties of the B-spline basis (run in CI): the mathematics of B-splines,
//! an independent closed form, finite differences for the derivative, and the public
//! API's typed errors on bad input.

use hybrid_kernels::check::{random_inputs, random_knots, GridLayout, Rng};
use hybrid_kernels::ops::bspline::{self, cpu, BasisKind, KnotGrid, MAX_SPLINE_ORDER};
use hybrid_kernels::{DType, Device, Error, Tensor};
use proptest::prelude::*;

fn layout() -> impl Strategy<Value = GridLayout> {
    prop_oneof![Just(GridLayout::Uniform), Just(GridLayout::NonUniform)]
}

/// Knots of one feature as f64.
fn knot_row(seed: u64, grid_size: usize, order: usize, layout: GridLayout) -> Vec<f64> {
    random_knots(&mut Rng::new(seed), 1, grid_size, order, layout).into_iter().map(f64::from).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Inside [t_k, t_{m-1-k}) the bases sum to one; all are >= 0; at most k + 1 are
    /// non-zero, and only those whose support [t_j, t_{j+k+1}) holds x.
    #[test]
    fn partition_of_unity_nonnegativity_local_support(
        seed in any::<u64>(), grid_size in 1usize..40, order in 0usize..=MAX_SPLINE_ORDER, layout in layout(), u in 0.0f64..1.0,
    ) {
        let t = knot_row(seed, grid_size, order, layout);
        let m = t.len();
        let x = t[order] + u * (t[m - 1 - order] - t[order]);
        prop_assume!(x < t[m - 1 - order]);
        let mut b = vec![0.0; m - 1 - order];
        cpu::basis_values(x, &t, order, &mut b);
        let sum: f64 = b.iter().sum();
        prop_assert!((sum - 1.0).abs() < 1e-12, "sum {sum}");
        prop_assert!(b.iter().all(|&v| v >= 0.0), "{b:?}");
        prop_assert!(b.iter().filter(|&&v| v != 0.0).count() <= order + 1, "{b:?}");
        for (j, &v) in b.iter().enumerate() {
            if !(x >= t[j] && x < t[j + order + 1]) {
                prop_assert_eq!(v, 0.0, "basis {} outside its support", j);
            }
        }
    }

    /// The analytic derivative against a central difference, away from knots (where
    /// the bases of order <= 1 have kinks).
    #[test]
    fn derivative_matches_finite_differences(
        seed in any::<u64>(), grid_size in 1usize..30, order in 1usize..=MAX_SPLINE_ORDER, layout in layout(), u in 0.0f64..1.0,
    ) {
        let t = knot_row(seed, grid_size, order, layout);
        let m = t.len();
        let x = t[0] + u * (t[m - 1] - t[0]);
        let h = 1e-6;
        let nearest_knot = t.iter().map(|k| (k - x).abs()).fold(f64::INFINITY, f64::min);
        prop_assume!(nearest_knot > 1e3 * h);
        let nb = m - 1 - order;
        let (mut lo, mut hi, mut d) = (vec![0.0; nb], vec![0.0; nb], vec![0.0; nb]);
        cpu::basis_values(x - h, &t, order, &mut lo);
        cpu::basis_values(x + h, &t, order, &mut hi);
        cpu::basis_derivatives(x, &t, order, &mut d);
        for j in 0..nb {
            let fd = (hi[j] - lo[j]) / (2.0 * h);
            let scale = d.iter().fold(1.0f64, |a, v| a.max(v.abs()));
            prop_assert!((fd - d[j]).abs() <= 1e-5 * scale, "basis {}: fd {} analytic {}", j, fd, d[j]);
        }
    }

    /// The derivatives of a partition of unity sum to zero.
    #[test]
    fn derivatives_sum_to_zero_inside(seed in any::<u64>(), grid_size in 1usize..30, order in 1usize..=MAX_SPLINE_ORDER, u in 0.0f64..1.0) {
        let t = knot_row(seed, grid_size, order, GridLayout::NonUniform);
        let m = t.len();
        let x = t[order] + u * (t[m - 1 - order] - t[order]);
        prop_assume!(x < t[m - 1 - order]);
        let mut d = vec![0.0; m - 1 - order];
        cpu::basis_derivatives(x, &t, order, &mut d);
        let scale = d.iter().fold(1.0f64, |a, v| a.max(v.abs()));
        prop_assert!(d.iter().sum::<f64>().abs() <= 1e-10 * scale);
    }

    /// The public CPU backend equals the f64 reference rounded once to the storage type.
    #[test]
    fn cpu_backend_rounds_the_reference_once(seed in any::<u64>(), batch in 1usize..20, in_features in 1usize..20, grid_size in 1usize..12, order in 0usize..=5) {
        let mut rng = Rng::new(seed);
        let knots = random_knots(&mut rng, in_features, grid_size, order, GridLayout::NonUniform);
        let n_knots = grid_size + 2 * order + 1;
        let x = random_inputs(&mut rng, batch, &knots, n_knots);
        let grid = KnotGrid::from_knots(&Tensor::from_vec(knots.clone(), &[in_features, n_knots], &Device::Cpu).unwrap(), order).unwrap();
        for dtype in DType::ALL {
            let xt = Tensor::from_f32(&x, &[batch, in_features], dtype, &Device::Cpu).unwrap();
            let out = bspline::bspline_basis(&xt, &grid).unwrap();
            prop_assert_eq!(out.dtype(), dtype);
            let knots64: Vec<f64> = knots.iter().map(|&v| v as f64).collect();
            let reference = cpu::evaluate_f64(BasisKind::Value, &xt.to_f64_vec().unwrap(), &knots64, n_knots, order);
            let got = out.to_f64_vec().unwrap();
            prop_assert_eq!(got.len(), batch * in_features * grid.n_bases());
            for (g, r) in got.iter().zip(&reference) {
                let rounded = match dtype {
                    DType::F32 => *r as f32 as f64,
                    DType::BF16 => half::bf16::from_f64(*r).to_f64(),
                    DType::F16 => half::f16::from_f64(*r).to_f64(),
                };
                prop_assert_eq!(*g, rounded);
            }
        }
    }
}

/// The uniform cubic B-spline has a closed form: on a grid of spacing h the basis
/// starting at t_j is B((x - t_j) / h) with the cardinal cubic
/// B(u) = u³/6, (-3u³ + 12u² - 12u + 4)/6, (3u³ - 24u² + 60u - 44)/6, (4 - u)³/6 on the
/// unit intervals of [0, 4).
#[test]
fn uniform_cubic_matches_closed_form() {
    fn cardinal_cubic(u: f64) -> f64 {
        match u {
            u if (0.0..1.0).contains(&u) => u.powi(3) / 6.0,
            u if (1.0..2.0).contains(&u) => (-3.0 * u.powi(3) + 12.0 * u * u - 12.0 * u + 4.0) / 6.0,
            u if (2.0..3.0).contains(&u) => (3.0 * u.powi(3) - 24.0 * u * u + 60.0 * u - 44.0) / 6.0,
            u if (3.0..4.0).contains(&u) => (4.0 - u).powi(3) / 6.0,
            _ => 0.0,
        }
    }
    let (grid_size, order, lo, hi) = (5usize, 3usize, -1.0f64, 1.0f64);
    let h = (hi - lo) / grid_size as f64;
    let t: Vec<f64> = (-(order as i64)..=(grid_size + order) as i64).map(|i| lo + i as f64 * h).collect();
    let mut rng = Rng::new(7);
    for _ in 0..2000 {
        let x = rng.uniform(t[0] - 0.5, t[t.len() - 1] + 0.5);
        let mut b = vec![0.0; grid_size + order];
        cpu::basis_values(x, &t, order, &mut b);
        for (j, &v) in b.iter().enumerate() {
            let expect = cardinal_cubic((x - t[j]) / h);
            assert!((v - expect).abs() < 1e-12, "x {x} basis {j}: {v} vs {expect}");
        }
    }
}

#[test]
fn outside_the_grid_nan_and_infinities() {
    let grid = KnotGrid::uniform(1, 5, 3, (-1.0, 1.0), &Device::Cpu).unwrap();
    let t = grid.knots().to_f32_vec().unwrap();
    let last = *t.last().unwrap();
    let xs = [t[0] - 1e-3, last, last + 1.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, t[0]];
    let x = Tensor::from_f32(&xs, &[xs.len(), 1], DType::F32, &Device::Cpu).unwrap();
    for out in [bspline::bspline_basis(&x, &grid).unwrap(), bspline::bspline_basis_derivative(&x, &grid).unwrap()] {
        let v = out.to_f32_vec().unwrap();
        let rows: Vec<&[f32]> = v.chunks(grid.n_bases()).collect();
        for r in &rows[..5] {
            assert!(r.iter().all(|&b| b == 0.0), "{r:?}");
        }
        assert!(rows[5].iter().all(|b| b.is_nan()));
        assert!(rows[6].iter().all(|b| b.is_finite()));
    }
    // At the first knot only the first basis is non-zero (x^k / ... = 0 except order 0 pieces).
    let b = bspline::bspline_basis(&x, &grid).unwrap().to_f32_vec().unwrap();
    assert_eq!(&b[6 * 8..7 * 8], &[0.0; 8]); // N_{0,3}(t_0) = 0: the cubic starts at zero
}

#[test]
fn repeated_knots_give_finite_bases() {
    let knots = vec![0.0f32, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0];
    let grid = KnotGrid::from_knots(&Tensor::from_vec(knots, &[1, 9], &Device::Cpu).unwrap(), 3).unwrap();
    let x = Tensor::from_f32(&[0.0, 0.25, 0.5, 0.75, 0.999], &[5, 1], DType::F32, &Device::Cpu).unwrap();
    let b = bspline::bspline_basis(&x, &grid).unwrap().to_f64_vec().unwrap();
    for row in b.chunks(grid.n_bases()) {
        assert!(row.iter().all(|v| v.is_finite() && *v >= 0.0), "{row:?}");
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-6, "clamped spline: partition of unity on [0, 1): {row:?}");
    }
}

#[test]
fn leading_dimensions_of_any_rank() {
    let grid = KnotGrid::uniform(3, 4, 2, (-1.0, 1.0), &Device::Cpu).unwrap();
    let x1 = Tensor::from_f32(&[0.1, 0.2, 0.3], &[3], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(bspline::bspline_basis(&x1, &grid).unwrap().shape(), &[3, 6]);
    let x3 = Tensor::full(0.5, &[2, 5, 3], DType::BF16, &Device::Cpu).unwrap();
    let out = bspline::bspline_basis(&x3, &grid).unwrap();
    assert_eq!(out.shape(), &[2, 5, 3, 6]);
    assert_eq!(out.dtype(), DType::BF16);
    let empty = Tensor::from_f32(&[], &[0, 3], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(bspline::bspline_basis(&empty, &grid).unwrap().shape(), &[0, 3, 6]);
}

fn expect_invalid(r: hybrid_kernels::Result<impl std::fmt::Debug>, arg: &str) {
    match r {
        Err(Error::InvalidArgument { arg: a, ref expected, ref found }) => {
            assert_eq!(a, arg, "expected {expected}, found {found}");
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains(arg) && msg.contains("expected") && msg.contains("found"), "{msg}");
        }
        other => panic!("expected InvalidArgument for `{arg}`, got {other:?}"),
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let cpu = Device::Cpu;
    expect_invalid(KnotGrid::uniform(4, 5, MAX_SPLINE_ORDER + 1, (-1.0, 1.0), &cpu), "order");
    expect_invalid(KnotGrid::uniform(4, 0, 3, (-1.0, 1.0), &cpu), "grid_size");
    expect_invalid(KnotGrid::uniform(0, 5, 3, (-1.0, 1.0), &cpu), "in_features");
    expect_invalid(KnotGrid::uniform(4, 5, 3, (1.0, -1.0), &cpu), "range");
    expect_invalid(KnotGrid::uniform(4, 5, 3, (f32::NAN, 1.0), &cpu), "range");

    let knots = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &cpu).unwrap();
    expect_invalid(KnotGrid::from_knots(&knots(vec![0.0, 1.0, 2.0], &[3]), 1), "knots");
    expect_invalid(KnotGrid::from_knots(&knots(vec![0.0, 1.0, 2.0], &[1, 3]), 2), "knots");
    expect_invalid(KnotGrid::from_knots(&knots(vec![0.0, 2.0, 1.0, 3.0], &[1, 4]), 1), "knots");
    assert!(matches!(
        KnotGrid::from_knots(&knots(vec![0.0, f32::INFINITY, 2.0, 3.0], &[1, 4]), 1),
        Err(Error::NonFinite { arg: "knots", index: 1, .. })
    ));
    let bf16_knots = Tensor::from_f32(&[0.0, 1.0, 2.0, 3.0], &[1, 4], DType::BF16, &cpu).unwrap();
    assert!(matches!(KnotGrid::from_knots(&bf16_knots, 1), Err(Error::DTypeMismatch { arg: "knots", .. })));

    let grid = KnotGrid::uniform(4, 5, 3, (-1.0, 1.0), &cpu).unwrap();
    let x_wrong = Tensor::full(0.0, &[2, 5], DType::F32, &cpu).unwrap();
    expect_invalid(bspline::bspline_basis(&x_wrong, &grid), "x");
    let scalar = Tensor::full(0.0, &[], DType::F32, &cpu).unwrap();
    expect_invalid(bspline::bspline_basis(&scalar, &grid), "x");

    let x = Tensor::full(0.0, &[2, 4], DType::F32, &cpu).unwrap();
    let mut wrong_shape = Tensor::full(0.0, &[2, 4, 7], DType::F32, &cpu).unwrap();
    expect_invalid(bspline::bspline_basis_into(&x, &grid, &mut wrong_shape), "out");
    let mut wrong_dtype = Tensor::full(0.0, &[2, 4, 8], DType::BF16, &cpu).unwrap();
    assert!(matches!(
        bspline::bspline_basis_into(&x, &grid, &mut wrong_dtype),
        Err(Error::DTypeMismatch { arg: "out", .. })
    ));
    let huge = Tensor::full(0.0, &[1, 4], DType::F32, &cpu).unwrap().reshape(&[usize::MAX, 4]);
    expect_invalid(huge, "shape");
}

#[test]
fn into_writes_every_element_of_a_poisoned_output() {
    let grid = KnotGrid::uniform(5, 7, 2, (-2.0, 2.0), &Device::Cpu).unwrap();
    let x = Tensor::from_f32(&[0.3; 15], &[3, 5], DType::F16, &Device::Cpu).unwrap();
    let mut out = Tensor::full(f32::NAN, &[3, 5, 9], DType::F16, &Device::Cpu).unwrap();
    bspline::bspline_basis_derivative_into(&x, &grid, &mut out).unwrap();
    assert!(out.to_f32_vec().unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn uniform_grids_are_recognised() {
    let cpu = Device::Cpu;
    // efficient-kan's default grids: the kernels' uniform row phase.
    for (g, k, range) in [(5, 3, (-1.0, 1.0)), (1, 0, (0.0, 1.0)), (20, 3, (-1.0, 1.0)), (10, 2, (-4.0, 3.0))] {
        let grid = KnotGrid::uniform(3, g, k, range, &cpu).unwrap();
        assert!(grid.is_uniform(), "G = {g}, k = {k}, range {range:?}");
    }
    let grid = |row: Vec<f32>| {
        let n = row.len();
        KnotGrid::from_knots(&Tensor::from_vec(row, &[1, n], &cpu).unwrap(), 1).unwrap()
    };
    assert!(grid(vec![-1.0, -0.5, 0.0, 0.5, 1.0]).is_uniform());
    // One knot moved by 1e-4 of the spacing, a repeated knot, a large offset.
    assert!(!grid(vec![-1.0, -0.49995, 0.0, 0.5, 1.0]).is_uniform());
    assert!(!grid(vec![-1.0, 0.0, 0.0, 0.5, 1.0]).is_uniform());
    assert!(!grid(vec![-1e31, 0.0, 1e31]).is_uniform());
    // A feature that is not uniform makes the grid general.
    let rows = vec![-1.0, 0.0, 1.0, 0.0, 0.1, 1.0];
    assert!(!KnotGrid::from_knots(&Tensor::from_vec(rows, &[2, 3], &cpu).unwrap(), 1).unwrap().is_uniform());
}
