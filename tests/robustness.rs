//! Regressions for inputs near the limits: sizes whose element count overflows or whose
//! memory cannot exist, zero-length inputs with huge batches, floats that would make a layer
//! non-finite, packed sequences next to non-finite ones, and the safetensors paths. Each
//! returns a typed error naming the caller's argument, or a correct result. CPU only, in CI.

mod common;

use hybrid_kernels::ops::bspline::{self, KnotGrid};
use hybrid_kernels::ops::causal_conv1d::{causal_conv1d, causal_conv1d_backward, ConvInputs};
use hybrid_kernels::ops::kan::{KanLinear, KanLinearConfig};
use hybrid_kernels::ops::mlstm::{mlstm, MlstmInputs, MlstmState};
use hybrid_kernels::ops::selective_scan::{selective_scan, selective_scan_backward, ScanInputs, SequenceResets};
use hybrid_kernels::ops::spline_activation::SplineActivation;
use hybrid_kernels::{load_safetensors, save_safetensors, DType, Device, Error, Tensor};

const CPU: Device = Device::Cpu;

fn t(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(values, shape, DType::F32, &CPU).unwrap()
}

/// A zero-element tensor of `shape` (no memory, whatever the other dimensions).
fn empty(shape: &[usize]) -> Tensor {
    Tensor::from_vec(Vec::<f32>::new(), shape, &CPU).unwrap()
}

/// The argument an error names, or "" for a variant without one.
fn arg_of(e: &Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. }
        | Error::HostOutOfMemory { arg, .. }
        | Error::NonFinite { arg, .. }
        | Error::DTypeMismatch { arg, .. }
        | Error::DeviceMismatch { arg, .. } => arg,
        _ => "",
    }
}

#[track_caller]
fn assert_names<T: std::fmt::Debug>(r: hybrid_kernels::Result<T>, arg: &str) {
    match r {
        Err(e) => assert_eq!(arg_of(&e), arg, "{e}"),
        Ok(v) => panic!("expected an error naming `{arg}`, got Ok({v:?})"),
    }
}

#[test]
fn grid_sizes_near_usize_limits_are_errors() {
    assert_names(KnotGrid::uniform(1, usize::MAX, 3, (-1.0, 1.0), &CPU), "grid_size");
    assert_names(KnotGrid::uniform(1, 1 << 40, 3, (-1.0, 1.0), &CPU), "grid_size");
    assert_names(KnotGrid::uniform(1 << 20, 1 << 20, 3, (-1.0, 1.0), &CPU), "in_features");
    assert_names(KnotGrid::uniform(usize::MAX, 5, 3, (-1.0, 1.0), &CPU), "in_features");
    let mut config = KanLinearConfig::new(2, 2);
    config.grid_size = usize::MAX;
    assert_names(KanLinear::new(config.clone(), DType::F32, &CPU, 0), "grid_size");
    config.grid_size = 1 << 40;
    assert_names(KanLinear::new(config, DType::F32, &CPU, 0), "grid_size");
    let wide = KanLinearConfig::new(1 << 20, 1 << 20);
    assert!(KanLinear::new(wide, DType::F32, &CPU, 0).is_err_and(|e| e.is_out_of_memory()));
    assert_names(SplineActivation::new(1, usize::MAX, 3, (-1.0, 1.0), false, DType::F32, &CPU), "grid_size");
    assert_names(SplineActivation::new(1, 1 << 40, 3, (-1.0, 1.0), false, DType::F32, &CPU), "grid_size");
    assert_names(SplineActivation::new(1 << 40, 5, 3, (-1.0, 1.0), true, DType::F32, &CPU), "channels");
    assert_names(SplineActivation::new(0, 5, 3, (-1.0, 1.0), true, DType::F32, &CPU), "channels");
}

#[test]
fn large_grids_that_fit_are_built_quickly() {
    // The fits are banded (O(G k^2)): a grid of 20000 intervals is built in well under a
    // second in release, not the O(G^3) of dense normal equations.
    let a = SplineActivation::new(2, 20_000, 3, (-1.0, 1.0), false, DType::F32, &CPU).unwrap();
    let y = a.forward(&t(&[0.25, -0.5], &[1, 2])).unwrap().to_f64_vec().unwrap();
    let silu = |x: f64| x / (1.0 + (-x).exp());
    assert!((y[0] - silu(0.25)).abs() < 1e-4 && (y[1] - silu(-0.5)).abs() < 1e-4, "{y:?}");
}

#[test]
fn tensors_that_cannot_exist_are_errors() {
    assert_names(Tensor::full(1.0, &[usize::MAX], DType::F32, &CPU), "shape");
    let e = Tensor::full(0.0, &[1 << 40], DType::F32, &CPU).unwrap_err();
    assert!(matches!(e, Error::HostOutOfMemory { arg: "shape", requested_bytes, .. } if requested_bytes == 1 << 42));
    assert!(e.to_string().contains("not enough host memory for `shape`"), "{e}");
    assert_names(Tensor::full(0.0, &[1 << 40], DType::BF16, &CPU), "shape");
    assert!(MlstmState::zeros(1 << 20, 1 << 20, 1, 1, &CPU).is_err_and(|e| e.is_out_of_memory()));
}

#[test]
fn sequence_resets_near_usize_limits_are_errors() {
    assert_names(SequenceResets::from_starts(usize::MAX, &[vec![]]), "len");
    assert_names(SequenceResets::from_starts(usize::MAX, &[vec![], vec![]]), "len");
    assert_names(SequenceResets::from_cu_seqlens(&[0, usize::MAX]), "cu_seqlens");
    assert_names(SequenceResets::from_cu_seqlens(&[0, 1 << 40]), "cu_seqlens");
}

#[test]
fn outputs_far_larger_than_the_inputs_are_errors() {
    // 2^20 inputs against 2^20 knots: 2^40 bases (4 TiB) from 8 MiB of input.
    let grid = KnotGrid::uniform(1, (1 << 20) - 7, 3, (-1.0, 1.0), &CPU).unwrap();
    let x = Tensor::full(0.5, &[1 << 20, 1], DType::F32, &CPU).unwrap();
    assert!(bspline::bspline_basis(&x, &grid).is_err_and(|e| e.is_out_of_memory() && arg_of(&e) == "x"));
    assert!(bspline::bspline_basis_derivative(&x, &grid).is_err_and(|e| e.is_out_of_memory()));

    // Zero-length sequences whose state alone would take terabytes.
    let (u, a, bc) = (empty(&[1 << 40, 1, 0]), t(&[-1.0], &[1, 1]), empty(&[1 << 40, 1, 1, 0]));
    let scan = ScanInputs::new(&u, &u, &a, &bc, &bc);
    assert!(selective_scan(&scan).is_err_and(|e| e.is_out_of_memory() && arg_of(&e) == "u"));
    let start = std::time::Instant::now();
    assert!(selective_scan_backward(&scan, &u, None, None).is_err_and(|e| e.is_out_of_memory()));
    assert!(start.elapsed().as_secs() < 5, "the backward must not walk 2^40 empty rows");
    let w = t(&[1.0, 2.0, 3.0, 4.0], &[1, 4]);
    let conv = ConvInputs::new(&u, &w);
    assert!(causal_conv1d(&conv).is_err_and(|e| e.is_out_of_memory() && arg_of(&e) == "x"));
    assert!(causal_conv1d_backward(&conv, &u, None).is_err_and(|e| e.is_out_of_memory()));

    // mLSTM with no steps: h is empty, the final state 2^62 values.
    let (q, g) = (empty(&[1 << 31, 1 << 31, 0, 1]), empty(&[1 << 31, 1 << 31, 0]));
    assert!(mlstm(&MlstmInputs::new(&q, &q, &q, &g, &g)).is_err());
}

#[test]
fn zero_length_inputs_of_ordinary_size_give_empty_outputs() {
    let (u, a, bc) = (empty(&[2, 3, 0]), t(&[-1.0; 6], &[3, 2]), empty(&[2, 1, 2, 0]));
    let o = selective_scan(&ScanInputs::new(&u, &u, &a, &bc, &bc)).unwrap();
    assert_eq!(o.out.shape(), &[2, 3, 0]);
    assert_eq!(o.last_state.to_f64_vec().unwrap(), vec![0.0; 12]);
    let g = selective_scan_backward(&ScanInputs::new(&u, &u, &a, &bc, &bc), &u, None, None).unwrap();
    assert_eq!(g.da.to_f64_vec().unwrap(), vec![0.0; 6]);
}

#[test]
fn a_reset_isolates_a_sequence_from_an_infinity_before_it() {
    // u = [inf, 1, 1, 1], delta 0.5, A = -1, B = C = 1, a new sequence at step 2.
    let u = t(&[f32::INFINITY, 1.0, 1.0, 1.0], &[1, 1, 4]);
    let delta = t(&[0.5; 4], &[1, 1, 4]);
    let (a, b) = (t(&[-1.0], &[1, 1]), t(&[1.0], &[1, 1]));
    let resets = SequenceResets::from_starts(4, &[vec![2]]).unwrap();
    let inputs = ScanInputs { resets: Some(&resets), ..ScanInputs::new(&u, &delta, &a, &b, &b) };
    let out = selective_scan(&inputs).unwrap().out.to_f64_vec().unwrap();
    // Alone, [1, 1] gives h = 0.5, then e^-0.5 0.5 + 0.5 = 0.80327.
    let (y0, y1) = (0.5, 0.5 * (-0.5f64).exp() + 0.5);
    assert!((out[2] - y0).abs() < 1e-6 && (out[3] - y1).abs() < 1e-6, "{out:?}");
    // Nothing of the second sequence's gradient reaches the first, nor the reverse.
    let dout = t(&[0.0, 0.0, 1.0, 1.0], &[1, 1, 4]);
    let g = selective_scan_backward(&inputs, &dout, None, None).unwrap();
    let du = g.du.to_f64_vec().unwrap();
    assert!(du[2..].iter().all(|v| v.is_finite()), "{du:?}");
    assert_eq!(&du[..2], &[0.0, 0.0]);

    // The same with the infinity after the reset: the first sequence stays finite.
    let u = t(&[1.0, 1.0, f32::INFINITY, 1.0], &[1, 1, 4]);
    let inputs = ScanInputs { resets: Some(&resets), ..ScanInputs::new(&u, &delta, &a, &b, &b) };
    let out = selective_scan(&inputs).unwrap().out.to_f64_vec().unwrap();
    assert!((out[0] - y0).abs() < 1e-6 && (out[1] - y1).abs() < 1e-6, "{out:?}");
    let dout = t(&[1.0, 1.0, 1.0, 1.0], &[1, 1, 4]);
    let du = selective_scan_backward(&inputs, &dout, None, None).unwrap().du.to_f64_vec().unwrap();
    assert!(du[..2].iter().all(|v| v.is_finite()), "{du:?}");

    // The conv: the second sequence never sees the first's infinity.
    let x = t(&[f32::INFINITY, 1.0, 1.0, 1.0], &[1, 1, 4]);
    let w = t(&[1.0, 1.0, 1.0, 1.0], &[1, 4]);
    let conv = ConvInputs { resets: Some(&resets), ..ConvInputs::new(&x, &w) };
    let out = causal_conv1d(&conv).unwrap().out.to_f64_vec().unwrap();
    assert_eq!(&out[2..], &[1.0, 2.0]);
    let dx = causal_conv1d_backward(&conv, &t(&[0.0, 0.0, 1.0, 1.0], &[1, 1, 4]), None).unwrap();
    assert_eq!(&dx.dx.to_f64_vec().unwrap()[..2], &[0.0, 0.0]);
}

#[test]
fn floats_that_would_make_a_layer_non_finite_are_errors() {
    let q = t(&[0.0; 4], &[1, 1, 2, 2]);
    let g = t(&[0.0; 2], &[1, 1, 2]);
    for eps in [0.0, -1e-6, f32::NAN, f32::INFINITY] {
        assert_names(mlstm(&MlstmInputs { eps, ..MlstmInputs::new(&q, &q, &q, &g, &g) }), "eps");
    }
    let mut layer = KanLinear::new(KanLinearConfig::new(2, 3), DType::F32, &CPU, 1).unwrap();
    assert_names(layer.regularization_loss(f64::NAN, 1.0), "activation");
    assert_names(layer.regularization_loss(1.0, f64::INFINITY), "entropy");
    let config = KanLinearConfig { scale_noise: 1e300, ..KanLinearConfig::new(2, 3) };
    assert_names(KanLinear::new(config, DType::F32, &CPU, 1), "scale_noise");
    let config = KanLinearConfig { scale_spline: 1e300, standalone_scale_spline: false, ..KanLinearConfig::new(2, 3) };
    assert_names(KanLinear::new(config, DType::F32, &CPU, 1), "scale_spline");
    // efficient-kan's kaiming gain shrinks as scale_base grows: 1e300 gives zero weights, finite.
    let config = KanLinearConfig { scale_base: 1e300, ..KanLinearConfig::new(2, 3) };
    assert!(KanLinear::new(config, DType::F32, &CPU, 1).is_ok());
    // f16 holds at most 65504: noise that f32 takes can be too large for it.
    let config = KanLinearConfig { scale_noise: 1e6, ..KanLinearConfig::new(2, 3) };
    assert!(KanLinear::new(config.clone(), DType::F32, &CPU, 1).is_ok());
    assert_names(KanLinear::new(config, DType::F16, &CPU, 1), "scale_noise");

    // update_grid: constant samples with margin 0 would collapse the grid; a margin of
    // 1e300 would make it infinite in f32. Both name the margin and leave the layer as it was.
    let before = layer.spline_weight().to_f64_vec().unwrap();
    let x = t(&[0.3, 0.3, 0.3, 0.3], &[2, 2]);
    assert_names(layer.update_grid(&x, 0.0), "margin");
    assert_names(layer.update_grid(&t(&[0.1, 0.2, 0.3, 0.4], &[2, 2]), 1e300), "margin");
    assert_eq!(layer.spline_weight().to_f64_vec().unwrap(), before);
    layer.update_grid(&x, 0.01).unwrap();
}

#[test]
fn safetensors_errors_name_the_file_and_the_problem() {
    let dir = std::env::temp_dir().join(format!("hk-robust-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.safetensors");
    let e = load_safetensors(&missing, &CPU).unwrap_err();
    assert!(e.to_string().contains("missing.safetensors"), "{e}");
    let short = dir.join("short.safetensors");
    std::fs::write(&short, [1u8, 2, 3]).unwrap();
    let e = load_safetensors(&short, &CPU).unwrap_err();
    assert!(e.to_string().contains("short.safetensors") && !e.to_string().contains("HeaderTooSmall"), "{e}");

    let x = t(&[1.0], &[1]);
    let out = dir.join("dup.safetensors");
    assert_names(save_safetensors(&out, &[("x", &x), ("x", &x)]), "tensors");
    assert!(!out.exists());
    // A failed write leaves what was there before untouched.
    save_safetensors(&out, &[("x", &x)]).unwrap();
    let before = std::fs::read(&out).unwrap();
    assert!(save_safetensors(&out, &[("x", &x), ("x", &x)]).is_err());
    assert_eq!(std::fs::read(&out).unwrap(), before);
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).collect();
    assert_eq!(leftovers.len(), 2, "no temporary files are left behind: {leftovers:?}");
    std::fs::remove_dir_all(dir).ok();
}

/// Packed rows on `device`: the outputs of each sequence, and the gradients reaching it, are
/// bit for bit those of a run where every other sequence holds different values, infinities
/// included (a scan's state is replaced at a reset, never multiplied by zero).
fn packed_sequences_are_isolated_on(device: &Device) {
    let (batch, dim, dstate, len) = (2, 8, 16, 300);
    let starts = vec![vec![0, 37, 150, 151, 299], vec![0, 5, 200]];
    let resets = SequenceResets::from_starts(len, &starts).unwrap().to_device(device).unwrap();
    let first_seq = |b: usize, t: usize| t < starts[b][1];
    let mut rng = hybrid_kernels::rng::Rng::new(7);
    let mut values = |n: usize| (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect::<Vec<f32>>();
    let seq = [batch, dim, len];
    let base_u = values(batch * dim * len);
    let delta = Tensor::from_f32(&values(batch * dim * len), &seq, DType::F32, device).unwrap();
    let a: Vec<f32> = values(dim * dstate).iter().map(|v| -1.0 - v.abs()).collect();
    let a = Tensor::from_f32(&a, &[dim, dstate], DType::F32, device).unwrap();
    let b = Tensor::from_f32(&values(batch * dstate * len), &[batch, 1, dstate, len], DType::F32, device).unwrap();
    let c = Tensor::from_f32(&values(batch * dstate * len), &[batch, 1, dstate, len], DType::F32, device).unwrap();
    let dout = Tensor::from_f32(&values(batch * dim * len), &seq, DType::F32, device).unwrap();
    // The first sequence of each row: ordinary values, or infinities and large values.
    let with_first = |poison: bool| {
        let mut u = base_u.clone();
        for (e, v) in u.iter_mut().enumerate() {
            let (bb, t) = (e / (dim * len), e % len);
            if poison && first_seq(bb, t) {
                *v = if t % 3 == 0 { f32::INFINITY } else { 3e38 };
            }
        }
        Tensor::from_f32(&u, &seq, DType::F32, device).unwrap()
    };
    let run = |u: &Tensor| {
        let inputs =
            ScanInputs { resets: Some(&resets), delta_softplus: true, ..ScanInputs::new(u, &delta, &a, &b, &c) };
        let out = selective_scan(&inputs).unwrap().out.to_f64_vec().unwrap();
        let du = selective_scan_backward(&inputs, &dout, None, None).unwrap().du.to_f64_vec().unwrap();
        let conv_w = Tensor::from_f32(&[0.5, -1.0, 2.0, 1.0], &[1, 4], DType::F32, device).unwrap();
        let conv_x = u.clone().reshape(&[batch * dim, 1, len]).unwrap();
        let conv_resets =
            SequenceResets::from_starts(len, &(0..batch * dim).map(|r| starts[r / dim].clone()).collect::<Vec<_>>())
                .unwrap();
        let conv = ConvInputs { resets: Some(&conv_resets), ..ConvInputs::new(&conv_x, &conv_w) };
        let conv_out = causal_conv1d(&conv).unwrap().out.to_f64_vec().unwrap();
        (out, du, conv_out)
    };
    let (clean, poisoned) = (run(&with_first(false)), run(&with_first(true)));
    for e in 0..batch * dim * len {
        let (bb, t) = (e / (dim * len), e % len);
        if first_seq(bb, t) {
            continue;
        }
        assert!(poisoned.0[e].is_finite(), "scan out at row {bb}, step {t}: {}", poisoned.0[e]);
        assert_eq!(clean.0[e].to_bits(), poisoned.0[e].to_bits(), "scan out at row {bb}, step {t}");
        assert_eq!(clean.1[e].to_bits(), poisoned.1[e].to_bits(), "scan du at row {bb}, step {t}");
        assert_eq!(clean.2[e].to_bits(), poisoned.2[e].to_bits(), "conv out at row {bb}, step {t}");
    }
}

#[test]
fn packed_sequences_are_isolated_on_the_cpu() {
    packed_sequences_are_isolated_on(&CPU);
}

#[test]
fn packed_sequences_are_isolated_on_the_gpu() {
    if let Some(device) = common::gpu("packed_sequences_are_isolated_on_the_gpu") {
        packed_sequences_are_isolated_on(&device);
    }
}

/// On a device, buffers larger than its memory are `Error::OutOfMemory` before anything is
/// allocated (no driver call is made for them).
#[test]
fn device_buffers_that_cannot_exist_are_errors() {
    let Some(gpu) = common::gpu("device_buffers_that_cannot_exist_are_errors") else { return };
    let total = gpu.as_cuda().unwrap().total_memory();
    let on = |t: Tensor| t.to_device(&gpu).unwrap();
    let too_large = |e: Error| matches!(e, Error::OutOfMemory { total_bytes: Some(t), requested_bytes, .. } if t == total && requested_bytes > total);
    let (u, a, bc) = (on(empty(&[1 << 40, 1, 0])), on(t(&[-1.0], &[1, 1])), on(empty(&[1 << 40, 1, 1, 0])));
    let scan = ScanInputs::new(&u, &u, &a, &bc, &bc);
    assert!(selective_scan(&scan).is_err_and(too_large));
    assert!(selective_scan_backward(&scan, &u, None, None).is_err_and(too_large));
    let w = on(t(&[1.0, 2.0, 3.0, 4.0], &[1, 4]));
    assert!(causal_conv1d(&ConvInputs::new(&u, &w)).is_err_and(too_large));
    let (q, g) = (on(empty(&[1 << 20, 1 << 20, 0, 64])), on(empty(&[1 << 20, 1 << 20, 0])));
    assert!(mlstm(&MlstmInputs::new(&q, &q, &q, &g, &g)).is_err_and(too_large));
    let grid = KnotGrid::uniform(1, (1 << 20) - 7, 3, (-1.0, 1.0), &gpu).unwrap();
    let x = Tensor::full(0.5, &[1 << 20, 1], DType::F32, &gpu).unwrap();
    assert!(bspline::bspline_basis(&x, &grid).is_err_and(too_large));
    // The device still works afterwards.
    let small = on(t(&[0.5], &[1, 1]));
    let g1 = KnotGrid::uniform(1, 5, 3, (-1.0, 1.0), &gpu).unwrap();
    assert_eq!(bspline::bspline_basis(&small, &g1).unwrap().shape(), &[1, 1, 8]);
}
