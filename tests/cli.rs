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

#[test]
fn run_never_loses_the_input_and_checks_the_output_path_first() {
    let dir = std::env::temp_dir().join(format!("hk-cli-paths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.safetensors");
    let grid = KnotGrid::uniform(3, 5, 3, (-1.0, 1.0), &Device::Cpu).unwrap();
    let x = Tensor::from_f32(&[0.1, -0.4, 0.9], &[1, 3], DType::F32, &Device::Cpu).unwrap();
    save_safetensors(&input, &[("x", &x), ("grid", grid.knots())]).unwrap();
    let before = std::fs::read(&input).unwrap();
    let run = |op: &str, output: &std::path::Path| {
        Command::new(bin())
            .args(["run", op, "--device", "cpu", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(output)
            .output()
            .unwrap()
    };
    // The output equal to the input (also through another spelling of the path).
    for output in [input.clone(), dir.join(".").join("in.safetensors")] {
        let out = run("bspline_basis", &output);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--output"), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(&input).unwrap(), before);
    }
    // A missing folder or a folder as the output: reported before the op runs.
    for output in [dir.join("no-such-folder").join("out.safetensors"), dir.clone()] {
        let out = run("bspline_basis", &output);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("--output"), "{err}");
    }
    // A spline order the grid cannot hold names --order.
    let out = run("kan_linear", &dir.join("out.safetensors"));
    assert!(!out.status.success());
    let kan_input = dir.join("kan.safetensors");
    let knots =
        Tensor::from_f32(&(0..12).map(|v| v as f32).collect::<Vec<_>>(), &[1, 12], DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::from_f32(&[0.0; 8], &[1, 1, 8], DType::F32, &Device::Cpu).unwrap();
    let x1 = Tensor::from_f32(&[0.5], &[1, 1], DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::from_f32(&[0.0], &[1, 1], DType::F32, &Device::Cpu).unwrap();
    save_safetensors(&kan_input, &[("x", &x1), ("grid", &knots), ("base_weight", &b), ("spline_weight", &w)]).unwrap();
    let out = Command::new(bin())
        .args(["run", "kan_linear", "--device", "cpu", "--order", "6", "--input"])
        .arg(&kan_input)
        .arg("--output")
        .arg(dir.join("out.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid `--order`"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn run_mlstm_refuses_a_partial_state() {
    let dir = std::env::temp_dir().join(format!("hk-cli-mlstm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.safetensors");
    let cpu = Device::Cpu;
    let q = Tensor::from_f32(&[0.5; 4], &[1, 1, 2, 2], DType::F32, &cpu).unwrap();
    let g = Tensor::from_f32(&[0.0; 2], &[1, 1, 2], DType::F32, &cpu).unwrap();
    let c = Tensor::from_f32(&[1.0; 4], &[1, 1, 2, 2], DType::F32, &cpu).unwrap();
    let n = Tensor::from_f32(&[1.0; 2], &[1, 1, 2], DType::F32, &cpu).unwrap();
    save_safetensors(&input, &[("q", &q), ("k", &q), ("v", &q), ("i", &g), ("f", &g), ("c", &c), ("n", &n)]).unwrap();
    let out = Command::new(bin())
        .args(["run", "mlstm", "--device", "cpu", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.join("out.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("only c, n") && err.contains("all of c, n, m"), "{err}");
    assert!(!dir.join("out.safetensors").exists());
    std::fs::remove_dir_all(dir).ok();
}
