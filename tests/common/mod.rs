//! Shared by the integration tests: the GPU-or-skip rule.
#![allow(dead_code)]

use hybrid_kernels::Device;
use std::io::Write;

/// Set to 1 on a GPU host: a missing GPU then fails the GPU tests instead of skipping them.
pub const REQUIRE_GPU_VAR: &str = "HYBRID_KERNELS_REQUIRE_GPU";

pub fn gpu_required() -> bool {
    std::env::var(REQUIRE_GPU_VAR).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// CUDA device 0, or None after printing why the calling test is skipped. Panics (the
/// test fails) when HYBRID_KERNELS_REQUIRE_GPU=1 and no device opens.
pub fn gpu(test: &str) -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) if gpu_required() => panic!("{REQUIRE_GPU_VAR}=1 but no CUDA device opens: {e}"),
        Err(e) => {
            static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
            let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
            if said.iter().any(|t| t == test) {
                return None;
            }
            said.push(test.to_string());
            // Written to the process's stderr directly: the test harness captures only
            // the print macros, and a skip must be visible.
            let _ =
                writeln!(std::io::stderr(), "SKIPPED {test}: no GPU ({e}); set {REQUIRE_GPU_VAR}=1 to fail instead");
            None
        }
    }
}

/// Proptest cases for a GPU property: `PROPTEST_CASES` when set (the sanitizer runs use few),
/// else `default`.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
