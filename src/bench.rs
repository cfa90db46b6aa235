//! The CLI's `bench`: every op's bench rows ([`crate::ops::registry::OPS`]), or one group's,
//! as a table or JSON. The shapes, targets and timed calls live with their ops
//! (`ops/<op>/bench.rs`), the timing machinery in [`crate::timing`]; the names below are
//! re-exported from there for `benches/` and earlier callers.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::registry::{bench_group, OPS};

pub use crate::ops::bspline::bench::{basis_flops, bench_basis, BasisShape, BASIS_SHAPES};
pub use crate::ops::causal_conv1d::bench::{bench_conv, bench_conv_step, ConvPass};
pub use crate::ops::kan::bench::{bench_kan, kan_target_us, KanPass, KanShape, KAN_SHAPES};
pub use crate::ops::mlstm::bench::{
    bench_mlstm, bench_mlstm_fwd_bwd, bench_mlstm_step, mlstm_target_us, mlstm_train_target_us, MlstmShape,
};
pub use crate::ops::selective_scan::bench::{
    bench_scan, bench_scan_step, scan_target_us, ScanPass, ScanShape, SCAN_SHAPES,
};
pub use crate::ops::spline_activation::bench::bench_activation;
pub use crate::timing::{copy_bandwidth_gbs, time_cuda, time_host, time_on, BenchContext, BenchRow, Repeats, Timing};

/// Runs the bench rows of every op, or of the op whose bench group is `group`, and returns
/// them with the copy bandwidth measured first (None on the CPU).
pub fn run_all(device: &Device, short: bool, group: Option<&str>) -> Result<(Vec<BenchRow>, Option<f64>)> {
    if let Some(g) = group {
        if bench_group(g).is_none() {
            let groups: Vec<&str> = OPS.iter().map(|op| op.bench_group).collect();
            return Err(Error::InvalidArgument { arg: "GROUP", expected: groups.join(", "), found: g.into() });
        }
    }
    let reps = if short { Repeats::SHORT } else { Repeats::FULL };
    let copy_gbs = match device {
        Device::Cuda(d) => Some(copy_bandwidth_gbs(d, reps)?),
        Device::Cpu => None,
    };
    let ctx = BenchContext { device, reps, short, copy_gbs };
    let mut rows = Vec::new();
    for op in OPS.iter().filter(|op| group.is_none_or(|g| g == op.bench_group)) {
        rows.extend((op.bench)(&ctx)?);
    }
    Ok((rows, copy_gbs))
}

/// The bench table as printed by `bench`.
pub fn print_table(device: &Device, rows: &[BenchRow], copy_gbs: Option<f64>) {
    match device {
        Device::Cuda(_) => {
            println!("== bench on {device} (median of CUDA-event times per launch; inputs rotated beyond L2)")
        }
        Device::Cpu => println!("== bench on cpu (median of host-clock times)"),
    }
    match copy_gbs {
        Some(c) => println!("device-to-device copy, measured now: {c:.0} GB/s (read + write)"),
        None => println!("(CPU path: host clock, reference implementation, batch capped at 64)"),
    }
    println!(
        "{:<26} {:<5} {:<28} {:>10} {:>10} {:>9} {:>8} {:>7} {:>14} {:>10}",
        "op", "dtype", "shape", "median us", "min us", "GB/s", "TFLOP/s", "% copy", "target us", "peak MiB"
    );
    for r in rows {
        let pct = r.pct_of_copy().map_or("-".to_string(), |p| format!("{p:.0}%"));
        let target = r
            .target_us
            .map_or("-".to_string(), |t| format!("{t:.0} {}", if r.timing.median_us <= t { "met" } else { "MISSED" }));
        let peak = r.peak_extra_bytes.map_or("-".to_string(), |b| format!("{:.1}", b as f64 / (1u64 << 20) as f64));
        println!(
            "{:<26} {:<5} {:<28} {:>10.1} {:>10.1} {:>9.1} {:>8.3} {:>7} {:>14} {:>10}",
            r.op,
            r.dtype,
            r.shape,
            r.timing.median_us,
            r.timing.min_us,
            r.gbs(),
            r.tflops(),
            pct,
            target,
            peak
        );
    }
    println!();
}

/// The bench rows as one JSON object (`bench --json`).
pub fn to_json(rows: &[BenchRow], copy_gbs: Option<f64>) -> String {
    let mut s = String::from("{\"copy_gbs\":");
    s += &copy_gbs.map_or("null".into(), |c| format!("{c:.1}"));
    s += ",\"rows\":[";
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s += &format!(
            "{{\"op\":\"{}\",\"dtype\":\"{}\",\"shape\":\"{}\",\"device\":\"{}\",\"median_us\":{:.3},\"min_us\":{:.3},\"max_us\":{:.3},\"samples\":{},\"bytes\":{},\"flops\":{},\"gbs\":{:.2},\"tflops\":{:.4},\"pct_of_copy\":{},\"target_us\":{},\"peak_extra_bytes\":{}}}",
            r.op,
            r.dtype,
            r.shape,
            r.device,
            r.timing.median_us,
            r.timing.min_us,
            r.timing.max_us,
            r.timing.samples,
            r.bytes,
            r.flops,
            r.gbs(),
            r.tflops(),
            r.pct_of_copy().map_or("null".into(), |p| format!("{p:.1}")),
            r.target_us.map_or("null".into(), |t| format!("{t:.1}")),
            r.peak_extra_bytes.map_or("null".into(), |b| b.to_string())
        );
    }
    s + "]}"
}
