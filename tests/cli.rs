//! The CLI end to end on the CPU path: `run` on a user's safetensors file and `check`.

use hybrid_kernels::ops::bspline::{self, KnotGrid};
use hybrid_kernels::{load_safetensors, save_safetensors, DType, Device, Tensor};
use std::process::Command;

/// The CLI binary: cargo's, or $HYBRID_KERNELS_BIN where the tests run from a bundle.
fn bin() -> String {
    std::env::var("HYBRID_KERNELS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hybrid-kernels").to_string())
}

#[test]
fn run_writes_the_op_output() {
    let dir = std::env::temp_dir().join(format!("hk-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let grid = KnotGrid::uniform(3, 5, 3, (-1.0, 1.0), &Device::Cpu).unwrap();
    let x = Tensor::from_f32(&[0.1, -0.4, 0.9, 0.0, 0.5, -1.2], &[2, 3], DType::F32, &Device::Cpu).unwrap();
    save_safetensors(&input, &[("x", &x), ("grid", grid.knots())]).unwrap();
    let out = Command::new(bin())
        .args(["run", "bspline_basis_derivative", "--device", "cpu", "--order", "3", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = &load_safetensors(&output, &Device::Cpu).unwrap()["out"];
    let expect = bspline::bspline_basis_derivative(&x, &grid).unwrap();
    assert_eq!(got.shape(), &[2, 3, 8]);
    assert_eq!(got.to_f64_vec().unwrap(), expect.to_f64_vec().unwrap());

    let bad = Command::new(bin())
        .args(["run", "no_such_op", "--device", "cpu", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no_such_op"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn check_passes_on_the_cpu_path() {
    let out = Command::new(bin()).args(["check", "--device", "cpu"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("all kernels pass") && text.contains("bspline_basis_derivative"), "{text}");
}

#[test]
fn unknown_arguments_fail_clearly() {
    let out = Command::new(bin()).args(["--frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frobnicate"));
}

#[test]
fn run_covers_the_kan_and_activation_ops() {
    use hybrid_kernels::ops::kan::{KanLinear, KanLinearConfig};
    use hybrid_kernels::ops::spline_activation::SplineActivation;
    let dir = std::env::temp_dir().join(format!("hk-cli-kan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let cpu = Device::Cpu;
    let layer = KanLinear::new(KanLinearConfig::new(3, 2), DType::F32, &cpu, 5).unwrap();
    let x = Tensor::from_f32(&[0.1, -0.4, 0.9, 0.0, 0.5, -1.2], &[2, 3], DType::F32, &cpu).unwrap();
    let dy = Tensor::from_f32(&[1.0, -0.5, 0.25, 2.0], &[2, 2], DType::F32, &cpu).unwrap();
    save_safetensors(
        &input,
        &[
            ("x", &x),
            ("dy", &dy),
            ("grid", layer.grid().knots()),
            ("base_weight", layer.base_weight()),
            ("spline_weight", layer.spline_weight()),
            ("spline_scaler", layer.spline_scaler().unwrap()),
        ],
    )
    .unwrap();
    let run = |op: &str| {
        let out = Command::new(bin())
            .args(["run", op, "--device", "cpu", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .output()
            .unwrap();
        assert!(out.status.success(), "{op}: {}", String::from_utf8_lossy(&out.stderr));
        load_safetensors(&output, &cpu).unwrap()
    };
    let y = &run("kan_linear")["y"];
    assert_eq!(y.to_f64_vec().unwrap(), layer.forward(&x).unwrap().to_f64_vec().unwrap());
    let g = run("kan_linear_backward");
    let expect = layer.backward(&x, &dy).unwrap();
    assert_eq!(g["dx"].to_f64_vec().unwrap(), expect.dx.to_f64_vec().unwrap());
    assert_eq!(g["d_spline_scaler"].to_f64_vec().unwrap(), expect.spline_scaler.unwrap().to_f64_vec().unwrap());

    let act = SplineActivation::new(3, 5, 3, (-1.0, 1.0), true, DType::F32, &cpu).unwrap();
    save_safetensors(
        &input,
        &[
            ("x", &x),
            ("dy", &Tensor::full(1.0, &[2, 3], DType::F32, &cpu).unwrap()),
            ("grid", act.grid().knots()),
            ("coeff", act.coeff()),
            ("base_weight", act.base_weight().unwrap()),
        ],
    )
    .unwrap();
    assert_eq!(run("spline_activation")["y"].to_f64_vec().unwrap(), act.forward(&x).unwrap().to_f64_vec().unwrap());
    let g = run("spline_activation_backward");
    assert!(g.contains_key("dx") && g.contains_key("d_coeff") && g.contains_key("d_base_weight"));
    std::fs::remove_dir_all(dir).ok();
}
