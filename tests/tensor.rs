//! The thin tensor: construction checks, dtype conversions, safetensors round trips,
//! and host <-> device copies (on a GPU when one is present).

mod common;

use hybrid_kernels::{load_safetensors, save_safetensors, DType, Device, Error, Tensor};

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("hybrid-kernels-test-{}-{name}", std::process::id()))
}

#[test]
fn from_vec_checks_the_length() {
    let r = Tensor::from_vec(vec![1.0f32; 5], &[2, 3], &Device::Cpu);
    assert!(matches!(r, Err(Error::InvalidArgument { arg: "data", .. })), "{r:?}");
    let overflow = Tensor::from_vec(vec![1.0f32; 1], &[usize::MAX, 2], &Device::Cpu);
    assert!(matches!(overflow, Err(Error::InvalidArgument { arg: "shape", .. })));
}

#[test]
fn dtype_conversions_round_to_nearest() {
    let t = Tensor::from_f32(&[1.0, 1.0 + 1.0 / 256.0, 3.3], &[3], DType::F32, &Device::Cpu).unwrap();
    let b = t.to_dtype(DType::BF16).unwrap();
    assert_eq!(b.dtype(), DType::BF16);
    assert_eq!(b.to_f32_vec().unwrap(), vec![1.0, 1.0, 3.296875]);
    assert!(matches!(b.to_vec::<f32>(), Err(Error::DTypeMismatch { .. })));
}

#[test]
fn safetensors_round_trip_every_dtype() {
    let path = tmp("roundtrip.safetensors");
    let a = Tensor::from_f32(&[1.5, -2.0, 3.25, 0.0, 7.0, -0.5], &[2, 3], DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::from_f32(&[1.5, -2.0], &[2], DType::BF16, &Device::Cpu).unwrap();
    let c = Tensor::from_f32(&[0.125; 4], &[1, 2, 2], DType::F16, &Device::Cpu).unwrap();
    save_safetensors(&path, &[("a", &a), ("b", &b), ("c", &c)]).unwrap();
    let back = load_safetensors(&path, &Device::Cpu).unwrap();
    for (name, t) in [("a", &a), ("b", &b), ("c", &c)] {
        let r = &back[name];
        assert_eq!(r.shape(), t.shape());
        assert_eq!(r.dtype(), t.dtype());
        assert_eq!(r.to_f64_vec().unwrap(), t.to_f64_vec().unwrap());
    }
    std::fs::remove_file(path).ok();
}

#[test]
fn safetensors_errors_are_typed() {
    assert!(matches!(load_safetensors(tmp("does-not-exist"), &Device::Cpu), Err(Error::Io { .. })));
    let garbage = tmp("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    assert!(matches!(load_safetensors(&garbage, &Device::Cpu), Err(Error::Safetensors { .. })));
    // An i32 tensor written by hand: 8-byte header length, JSON header, data.
    let header = br#"{"x":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&7i32.to_le_bytes());
    std::fs::write(&garbage, bytes).unwrap();
    let e = load_safetensors(&garbage, &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("I32") && e.to_string().contains("`x`"), "{e}");
    std::fs::remove_file(garbage).ok();
}

#[test]
fn device_round_trip() {
    let Some(gpu) = common::gpu("device_round_trip") else { return };
    for dtype in DType::ALL {
        let t = Tensor::from_f32(&[1.0, -2.5, 1e-3, 65504.0], &[2, 2], dtype, &Device::Cpu).unwrap();
        let d = t.to_device(&gpu).unwrap();
        assert_eq!(d.device(), gpu);
        assert_eq!(d.to_device(&Device::Cpu).unwrap().to_f64_vec().unwrap(), t.to_f64_vec().unwrap());
    }
    let path = tmp("gpu.safetensors");
    let t = Tensor::from_f32(&[0.5; 6], &[3, 2], DType::BF16, &gpu).unwrap();
    save_safetensors(&path, &[("t", &t)]).unwrap();
    let back = load_safetensors(&path, &gpu).unwrap();
    assert_eq!(back["t"].device(), gpu);
    assert_eq!(back["t"].to_f64_vec().unwrap(), vec![0.5; 6]);
    std::fs::remove_file(path).ok();
}

#[test]
fn no_driver_or_no_device_is_an_error_not_a_panic() {
    match Device::cuda(0) {
        Ok(_) => assert!(matches!(Device::cuda(usize::MAX), Err(Error::NoDevice { .. }))),
        Err(e) => {
            assert!(!common::gpu_required(), "GPU required but: {e}");
            assert!(matches!(e, Error::DriverNotFound | Error::NoDevice { .. } | Error::Driver { .. }), "{e}");
        }
    }
}
