//! The kernels' public entry points. Each op is one unit: `cuda/<op>.cu`, `ops/<op>/`
//! (validation and public API in `mod.rs`, the f64 CPU reference in `cpu.rs`, launches in
//! `cuda.rs`), `tests/<op>*.rs` and `benches/<op>.rs`.

pub mod bspline;
pub mod causal_conv1d;
pub mod kan;
pub mod selective_scan;
pub mod sequence_resets;
pub mod spline_activation;
