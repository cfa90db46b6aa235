//! `hybrid-kernels`: device info, kernel checks against the CPU references, benchmarks,
//! and running one op on user tensors. With no arguments: `info`, `check`, short `bench`.

use hybrid_kernels::bench::{
    self, BenchRow, ConvPass, KanPass, MlstmShape, Repeats, ScanPass, BASIS_SHAPES, KAN_SHAPES,
};
use hybrid_kernels::check::{
    conv_tolerance, decode_against_conv, decode_against_mlstm, kan_tolerance, mlstm_grad_tolerance, mlstm_tolerance,
    scan_tolerance, tolerance, ActivationCase, BasisCase, ConvCase, GridLayout, KanCase, MlstmCase, Rng, ScanCase,
};
use hybrid_kernels::device::{cuda_device_count, driver_available, driver_version};
use hybrid_kernels::kernels::{KernelModule, PTX_ORIGIN};
use hybrid_kernels::ops::bspline::{self, BasisKind, KnotGrid};
use hybrid_kernels::ops::causal_conv1d::{causal_conv1d, causal_conv1d_backward, causal_conv1d_update, ConvInputs};
use hybrid_kernels::ops::kan::{KanForwardPath, KanLinear, KanLinearConfig};
use hybrid_kernels::ops::mlstm::{
    mlstm, mlstm_backward, mlstm_step, MlstmInputs, MlstmState, NormalizerGrad, DEFAULT_EPS,
};
use hybrid_kernels::ops::selective_scan::{selective_scan, selective_scan_backward, ScanInputs};
use hybrid_kernels::ops::spline_activation::SplineActivation;
use hybrid_kernels::{load_safetensors, save_safetensors, DType, Device, Error, Result, Tensor};
use std::process::ExitCode;

const USAGE: &str = "\
usage: hybrid-kernels [COMMAND] [OPTIONS]

commands:
  info                     devices, driver, compute capability, embedded PTX
  check [--seed N]         every kernel against its f64 CPU reference on random inputs
  bench [GROUP] [--json] [--short]
                           every kernel at standard shapes (CUDA events, median);
                           GROUP (basis, kan, activation, scan, conv, mlstm) times
                           only
                           that group
  run OP --input IN.safetensors --output OUT.safetensors [--order K]
                           run one op on your tensors (K: spline order, default 3).
                           IN holds `x` (.., in) and `grid` (in, n_knots, f32), and:
                             bspline_basis, bspline_basis_derivative: nothing more
                               -> out
                             kan_linear: base_weight, spline_weight[, spline_scaler]
                               -> y
                             kan_linear_backward: the same and dy
                               -> dx, d_base_weight, d_spline_weight[, d_spline_scaler]
                             spline_activation: coeff[, base_weight] -> y
                             spline_activation_backward: the same and dy
                               -> dx, d_coeff[, d_base_weight]
                           The scan takes no grid: IN holds u, delta (B, D, L), A (D, N)
                           f32, B, C ((B, G, N, L) or (D, N) f32) and optionally D,
                           delta_bias (D) f32, z (B, D, L), h0 (B, D, N) f32; --softplus
                           applies softplus to delta + delta_bias:
                             selective_scan -> out, last_state
                             selective_scan_backward: the same and dout[, dlast_state]
                               -> du, ddelta, dA, dB, dC[, dD, dz, ddelta_bias, dh0]
                           The conv1d takes x (B, D, L), weight (D, W) f32 (W 2..4) and
                           optionally bias (D) f32, initial_state (B, D, W-1); --silu
                           applies SiLU:
                             causal_conv1d -> out, final_state
                             causal_conv1d_backward: the same and dout[, dfinal_state]
                               -> dx, dweight[, dbias, dinitial_state]
                             causal_conv1d_update: x (B, D[, T]), weight[, bias] and
                               state (B, D, S >= W-1) -> out, state
                           The mLSTM takes q, k (B, NH, S, DQK), v (B, NH, S, DHV), i, f
                           (B, NH, S) f32 and optionally an initial state c (B, NH, DQK,
                           DHV), n (B, NH, DQK), m (B, NH), all f32; --chunk N picks the
                           GPU chunk (16, 32, 64, 128):
                             mlstm -> h, c, n, m (the final state)
                             mlstm_backward: the same and dh[, dc, dn, dm]; --constant-
                               normalizer holds the denominator and m constant (as
                               mlstm_kernels does) -> dq, dk, dv, di, df[, dc0, dn0, dm0]
                             mlstm_step: q, k (B, NH, DQK), v (B, NH, DHV), i, f (B, NH)
                               and c, n, m -> h, c, n, m
  (none)                   info, check and a short bench

options for every command:
  --device cpu|cuda:N      where to run (default: cuda:0 when present, else cpu)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Ok(false): a check failed.
fn dispatch(args: &[String]) -> Result<bool> {
    let mut opts = Options::parse(args)?;
    if opts.help {
        print!("{USAGE}");
        return Ok(true);
    }
    let device = opts.device()?;
    match opts.command.as_deref() {
        None => {
            info(&device)?;
            let ok = check(&device, opts.seed)?;
            bench_cmd(&device, false, true, None)?;
            Ok(ok)
        }
        Some("info") => info(&device).map(|_| true),
        Some("check") => check(&device, opts.seed),
        Some("bench") => {
            bench_cmd(&device, opts.json, opts.short, opts.positional.first().map(String::as_str)).map(|_| true)
        }
        Some("run") => run(&device, &mut opts).map(|_| true),
        Some(other) => Err(Error::InvalidArgument {
            arg: "command",
            expected: "info, check, bench or run".into(),
            found: other.into(),
        }),
    }
}

#[derive(Default)]
struct Options {
    command: Option<String>,
    positional: Vec<String>,
    device: Option<String>,
    input: Option<String>,
    output: Option<String>,
    order: Option<usize>,
    seed: Option<u64>,
    json: bool,
    short: bool,
    softplus: bool,
    silu: bool,
    constant_normalizer: bool,
    chunk: Option<usize>,
    help: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &'static str| {
                it.next().cloned().ok_or_else(|| Error::InvalidArgument {
                    arg: name,
                    expected: "a value".into(),
                    found: "nothing".into(),
                })
            };
            match a.as_str() {
                "-h" | "--help" | "help" => o.help = true,
                "--json" => o.json = true,
                "--short" => o.short = true,
                "--softplus" => o.softplus = true,
                "--silu" => o.silu = true,
                "--constant-normalizer" => o.constant_normalizer = true,
                "--chunk" => o.chunk = Some(parse_num("--chunk", &value("--chunk")?)?),
                "--device" => o.device = Some(value("--device")?),
                "--input" => o.input = Some(value("--input")?),
                "--output" => o.output = Some(value("--output")?),
                "--order" => o.order = Some(parse_num("--order", &value("--order")?)?),
                "--seed" => o.seed = Some(parse_num("--seed", &value("--seed")?)?),
                s if s.starts_with('-') => {
                    return Err(Error::InvalidArgument {
                        arg: "option",
                        expected: "see --help".into(),
                        found: s.into(),
                    })
                }
                s if o.command.is_none() => o.command = Some(s.into()),
                s => o.positional.push(s.into()),
            }
        }
        Ok(o)
    }

    fn device(&self) -> Result<Device> {
        match self.device.as_deref() {
            None => {
                let (d, why) = Device::cuda_or_cpu();
                if let Some(why) = why {
                    println!("no GPU: {why}\n-> running the CPU path (f64 reference implementations)\n");
                }
                Ok(d)
            }
            Some("cpu") => Ok(Device::Cpu),
            Some(s) => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Device::cuda(n),
                None => {
                    Err(Error::InvalidArgument { arg: "--device", expected: "cpu or cuda:N".into(), found: s.into() })
                }
            },
        }
    }
}

fn parse_num<T: std::str::FromStr>(arg: &'static str, s: &str) -> Result<T> {
    s.parse().map_err(|_| Error::InvalidArgument { arg, expected: "a non-negative integer".into(), found: s.into() })
}

fn info(device: &Device) -> Result<()> {
    println!("== info");
    println!("hybrid-kernels {}", env!("CARGO_PKG_VERSION"));
    println!("embedded PTX: {PTX_ORIGIN}");
    for m in KernelModule::ALL {
        let (ma, mi) = m.min_compute_capability();
        let sm90 = if m.ptx_sm90().is_some() { "; a compute_90 build for sm_90+" } else { "" };
        println!("  module {:<10} PTX ISA {}, runs on sm_{ma}{mi}+{sm90}", m.name(), m.ptx_isa());
    }
    if !driver_available() {
        println!("CUDA driver: not found (libcuda.so); CPU path only");
        println!();
        return Ok(());
    }
    match (driver_version(), cuda_device_count()) {
        (Ok(v), Ok(n)) => {
            println!("CUDA driver: supports CUDA {v}; {n} device(s)");
            for i in 0..n {
                match Device::cuda(i) {
                    Ok(Device::Cuda(d)) => {
                        let (ma, mi) = d.compute_capability();
                        let (free, total) = d.memory_info()?;
                        println!(
                            "  cuda:{i} {} sm_{ma}{mi}, {} SMs, {:.1} / {:.1} GiB free",
                            d.name(),
                            d.multiprocessors(),
                            free as f64 / (1u64 << 30) as f64,
                            total as f64 / (1u64 << 30) as f64
                        );
                        match d.load_all_modules() {
                            Ok(()) => println!("    all kernel modules load"),
                            Err(e) => println!("    kernel modules do not load: {e}"),
                        }
                    }
                    Ok(Device::Cpu) => {}
                    Err(e) => println!("  cuda:{i} cannot be opened: {e}"),
                }
            }
        }
        (Err(e), _) | (_, Err(e)) => println!("CUDA driver: {e}"),
    }
    println!("running on: {device}");
    println!();
    Ok(())
}

fn check(device: &Device, seed: Option<u64>) -> Result<bool> {
    let mut rng = seed.map_or_else(Rng::from_time, Rng::new);
    let seed_used = rng.clone().next_u64();
    println!("== check on {device} (inputs seeded {seed_used:#x}; every output NaN-poisoned before launch)");
    if !device.is_cuda() {
        println!("(CPU path: the CPU backend against the f64 reference; only output rounding is measured)");
    }
    let cases: Vec<(usize, usize, usize, usize, GridLayout)> = vec![
        // (batch, in, G, k, layout): odd sizes, every order, all grid layouts.
        (1, 1, 1, 0, GridLayout::Uniform),
        (7, 33, 5, 3, GridLayout::Uniform),
        (33, 7, 3, 1, GridLayout::NonUniform),
        (1025, 33, 20, 3, GridLayout::NonUniform),
        (64, 100, 5, 2, GridLayout::Repeated),
        (17, 1025, 7, 4, GridLayout::NonUniform),
        (5, 64, 100, 5, GridLayout::Uniform),
        (3, 9, 4, 7, GridLayout::NonUniform),
        // More than 128 bases per row: the kernel's row-broadcast write path.
        (5, 7, 300, 3, GridLayout::NonUniform),
    ];
    println!("{:<26} {:<6} {:>7} {:>12} {:>10}  result", "kernel", "dtype", "cases", "max rel err", "tolerance");
    let mut all_ok = true;
    for kind in [BasisKind::Value, BasisKind::Derivative] {
        for dtype in DType::ALL {
            let mut worst = 0.0f64;
            for &(batch, in_features, grid_size, order, layout) in &cases {
                let case = BasisCase { batch, in_features, grid_size, order, layout, dtype, kind };
                worst = worst.max(case.run(&mut rng, device)?);
            }
            let tol = tolerance(kind, dtype);
            let ok = worst <= tol;
            all_ok &= ok;
            let name = if kind == BasisKind::Value { "bspline_basis" } else { "bspline_basis_derivative" };
            println!(
                "{name:<26} {dtype:<6} {:>7} {worst:>12.3e} {tol:>10.1e}  {}",
                cases.len(),
                if ok { "pass" } else { "FAIL" }
            );
        }
    }
    // KANLinear: forward and every gradient (worst of y, dx, dW_base, dW_spline, dscaler).
    let kan_cases: &[(usize, usize, usize, usize, usize, bool)] = &[
        // (batch, in, out, G, k, scaler)
        (1, 1, 1, 1, 1, false),
        (33, 7, 33, 5, 3, true),
        (65, 33, 17, 20, 2, true),
        (7, 12, 5, 100, 3, false),
        (130, 9, 129, 3, 1, true),
        (100, 50, 40, 13, 3, true),
    ];
    for (dtype, tf32, path) in [
        (DType::F32, false, KanForwardPath::Gemm),
        (DType::F32, true, KanForwardPath::Gemm),
        (DType::BF16, false, KanForwardPath::Gemm),
        (DType::F16, false, KanForwardPath::Gemm),
        (DType::F32, false, KanForwardPath::Direct),
        (DType::F32, false, KanForwardPath::DirectTf32x3),
        (DType::BF16, false, KanForwardPath::Direct),
        (DType::F16, false, KanForwardPath::Direct),
    ] {
        let direct = matches!(path, KanForwardPath::Direct | KanForwardPath::DirectTf32x3);
        if (tf32 || direct) && !device.is_cuda() {
            continue;
        }
        let mut worst = 0.0f64;
        let mut n = 0;
        for &(batch, in_features, out_features, grid_size, order, scaler) in kan_cases {
            // The direct forward covers orders 1..=3 with up to 8 bases.
            if direct && grid_size + order > 8 {
                continue;
            }
            let case = KanCase { batch, in_features, out_features, grid_size, order, scaler, dtype, tf32, path };
            worst = worst.max(case.run(rng.next_u64(), device)?.max());
            n += 1;
        }
        let tol = kan_tolerance(dtype, tf32);
        let ok = worst <= tol;
        all_ok &= ok;
        let name = match (tf32, path) {
            (true, _) => "kan_linear fwd+grads tf32",
            (false, KanForwardPath::Direct) => "kan_linear direct+grads",
            (false, KanForwardPath::DirectTf32x3) => "kan_linear tf32x3+grads",
            _ => "kan_linear fwd+grads",
        };
        println!("{name:<26} {dtype:<6} {n:>7} {worst:>12.3e} {tol:>10.1e}  {}", if ok { "pass" } else { "FAIL" });
    }
    // B-spline activation: forward and every gradient (worst of y, dx, dcoeff, dw).
    let act_cases: &[(usize, usize, usize, usize, bool)] =
        &[(1, 1, 1, 1, false), (33, 7, 5, 3, true), (1025, 33, 20, 2, true), (7, 64, 100, 3, false)];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut worst = 0.0f64;
        for &(rows, channels, grid_size, order, with_base) in act_cases {
            let case = ActivationCase { rows, channels, grid_size, order, with_base, dtype };
            worst = worst.max(case.run(rng.next_u64(), device)?);
        }
        let tol = kan_tolerance(dtype, false);
        let ok = worst <= tol;
        all_ok &= ok;
        println!(
            "{:<26} {dtype:<6} {:>7} {worst:>12.3e} {tol:>10.1e}  {}",
            "spline_activation fwd+grads",
            act_cases.len(),
            if ok { "pass" } else { "FAIL" }
        );
    }
    // Selective scan: output, last state and every gradient (the worst of them).
    let scan_cases: &[(usize, usize, usize, usize, usize, u32)] = &[
        // (batch, dim, dstate, len, groups, option bits of ScanCase::from_option_bits)
        (1, 1, 1, 1, 1, 0b11_1111_1100),
        (2, 7, 16, 33, 1, 0b01_0111_1100),
        (3, 66, 16, 1025, 2, 0b11_1111_1100),
        (1, 33, 4, 257, 1, 0b10_1000_0011),
        (2, 8, 64, 300, 4, 0b11_0111_1110),
        (1, 5, 256, 70, 1, 0b11_1111_1101),
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut worst = 0.0f64;
        for &(batch, dim, dstate, len, groups, flags) in scan_cases {
            let case = ScanCase::from_option_bits(batch, dim, dstate, len, groups, flags, dtype);
            worst = case.run(rng.next_u64(), device)?.into_iter().fold(worst, |w, (_, e)| w.max(e));
        }
        let tol = scan_tolerance(dtype);
        let ok = worst <= tol;
        all_ok &= ok;
        println!(
            "{:<26} {dtype:<6} {:>7} {worst:>12.3e} {tol:>10.1e}  {}",
            "selective_scan fwd+grads",
            scan_cases.len(),
            if ok { "pass" } else { "FAIL" }
        );
    }
    // Causal conv1d: output, final state and every gradient; decoding against the conv.
    let conv_cases: &[(usize, usize, usize, usize, u32)] = &[
        // (batch, dim, len, width, option bits of ConvCase::from_option_bits)
        (1, 1, 1, 2, 0b11111),
        (2, 7, 33, 3, 0b10111),
        (3, 40, 1025, 4, 0b11111),
        (1, 33, 3000, 4, 0b00011),
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut worst = 0.0f64;
        for &(batch, dim, len, width, flags) in conv_cases {
            let case = ConvCase::from_option_bits(batch, dim, len, width, flags, dtype);
            worst = case.run(rng.next_u64(), device)?.into_iter().fold(worst, |w, (_, e)| w.max(e));
            let (out, last) = decode_against_conv(&case, rng.next_u64(), device, 7, width + 2)?;
            worst = worst.max(out).max(last);
        }
        let tol = conv_tolerance(dtype);
        let ok = worst <= tol;
        all_ok &= ok;
        println!(
            "{:<26} {dtype:<6} {:>7} {worst:>12.3e} {tol:>10.1e}  {}",
            "causal_conv1d fwd+grads",
            conv_cases.len(),
            if ok { "pass" } else { "FAIL" }
        );
    }
    // mLSTM: h and the final state against the f64 recurrence; decoding against the pass.
    // (batch, heads, len, dqk, dhv, initial state, extreme gates, chunk)
    type MlstmCheck = (usize, usize, usize, usize, usize, bool, bool, Option<usize>);
    let mlstm_cases: &[MlstmCheck] = &[
        (1, 1, 1, 16, 16, true, false, None),
        (2, 3, 65, 33, 40, false, false, Some(32)),
        (1, 2, 300, 128, 128, true, true, None),
        (1, 1, 200, 256, 96, true, false, Some(16)),
        (2, 2, 130, 64, 64, false, false, Some(128)),
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut worst = 0.0f64;
        for &(batch, heads, len, dqk, dhv, init, extreme, chunk) in mlstm_cases {
            let case = MlstmCase { with_init: init, chunk, ..MlstmCase::new(batch, heads, len, dqk, dhv, dtype) }
                .with_extreme_gates(extreme);
            worst = case.run_forward(rng.next_u64(), device)?.into_iter().fold(worst, |w, (_, e)| w.max(e));
            if len <= 70 {
                worst = decode_against_mlstm(&case, rng.next_u64(), device)?.into_iter().fold(worst, f64::max);
            }
        }
        let tol = mlstm_tolerance(dtype);
        let ok = worst <= tol;
        all_ok &= ok;
        println!(
            "{:<26} {dtype:<6} {:>7} {worst:>12.3e} {tol:>10.1e}  {}",
            "mlstm fwd+decode",
            mlstm_cases.len(),
            if ok { "pass" } else { "FAIL" }
        );
    }
    // mLSTM gradients against the f64 backward: the worst error over its allowance
    // (mlstm_grad_tolerance times the problem's conditioning), shown as error / conditioning.
    // (batch, heads, len, dqk, dhv, initial state, final-state gradient, extreme, chunk, exact)
    type MlstmGradCheck = (usize, usize, usize, usize, usize, bool, bool, bool, Option<usize>, bool);
    let grad_cases: &[MlstmGradCheck] = &[
        (1, 1, 1, 16, 16, true, true, false, None, true),
        (2, 2, 65, 33, 40, false, true, false, Some(16), true),
        (1, 2, 130, 64, 64, true, false, false, Some(64), false),
        (1, 2, 100, 128, 128, true, true, true, None, true),
        (1, 1, 70, 200, 96, true, true, false, Some(32), true),
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut worst = 0.0f64;
        for (n, &(batch, heads, len, dqk, dhv, init, dfinal, extreme, chunk, exact)) in grad_cases.iter().enumerate() {
            // Every other case from the saved training forward, the others recomputing it.
            let case = MlstmCase {
                with_init: init,
                with_dfinal: dfinal,
                chunk,
                saved_forward: n % 2 == 1,
                ..MlstmCase::new(batch, heads, len, dqk, dhv, dtype)
            }
            .with_extreme_gates_for_grads(extreme);
            let mode = if exact { NormalizerGrad::Exact } else { NormalizerGrad::Constant };
            worst =
                case.run_backward(rng.next_u64(), device, mode)?.into_iter().fold(worst, |w, (_, e, c)| w.max(e / c));
        }
        let tol = mlstm_grad_tolerance(dtype);
        let ok = worst <= tol;
        all_ok &= ok;
        println!(
            "{:<26} {dtype:<6} {:>7} {worst:>12.3e} {tol:>10.1e}  {}",
            "mlstm grads (err/cond)",
            grad_cases.len(),
            if ok { "pass" } else { "FAIL" }
        );
    }
    println!("check: {}\n", if all_ok { "all kernels pass" } else { "FAILURES above" });
    Ok(all_ok)
}

fn bench_cmd(device: &Device, json: bool, short: bool, group: Option<&str>) -> Result<()> {
    const GROUPS: [&str; 6] = ["basis", "kan", "activation", "scan", "conv", "mlstm"];
    if let Some(g) = group.filter(|g| !GROUPS.contains(g)) {
        return Err(Error::InvalidArgument {
            arg: "GROUP",
            expected: "basis, kan, activation, scan, conv or mlstm".into(),
            found: g.into(),
        });
    }
    if std::env::var("HYBRID_KERNELS_POISON").is_ok_and(|v| !v.is_empty() && v != "0") {
        eprintln!(
            "warning: HYBRID_KERNELS_POISON is set: every output allocation is filled with NaN bytes first, \
             and the timings below include those fills; unset it to benchmark"
        );
    }
    let wanted = |g: &str| group.is_none_or(|w| w == g);
    let reps = if short { Repeats::SHORT } else { Repeats::FULL };
    let copy_gbs = match device {
        Device::Cuda(d) => Some(bench::copy_bandwidth_gbs(d, reps)?),
        Device::Cpu => None,
    };
    let mut rows: Vec<BenchRow> = Vec::new();
    let dtypes: &[DType] = if short { &[DType::F32, DType::BF16] } else { &[DType::F32, DType::BF16, DType::F16] };
    for &shape in BASIS_SHAPES.iter().filter(|_| wanted("basis")) {
        // The CPU reference is slow at full size: scale the batch down and say so in the row.
        let shape = if device.is_cuda() { shape } else { bench::BasisShape { batch: shape.batch.min(64), ..shape } };
        for kind in [BasisKind::Value, BasisKind::Derivative] {
            for &dtype in dtypes {
                rows.push(bench::bench_basis(device, kind, dtype, shape, reps, copy_gbs)?);
            }
        }
    }
    for &shape in KAN_SHAPES.iter().filter(|_| wanted("kan")) {
        // The f64 CPU reference is far too slow for these shapes: scale them down there.
        let shape = if device.is_cuda() {
            shape
        } else {
            bench::KanShape { batch: 16, in_features: 64, out_features: 64, ..shape }
        };
        for pass in [KanPass::Forward, KanPass::ForwardBackward] {
            for (dtype, tf32) in [(DType::BF16, false), (DType::F32, false), (DType::F32, true)] {
                if short && (dtype, tf32) == (DType::F32, true) {
                    continue;
                }
                if tf32 && !device.is_cuda() {
                    continue;
                }
                rows.push(bench::bench_kan(device, pass, dtype, tf32, KanForwardPath::Auto, shape, reps)?);
            }
        }
        // The direct forwards, forced, where they cover the layer.
        if device.is_cuda() && !short && shape.grid_size + shape.order <= 8 {
            for (dtype, path) in [
                (DType::BF16, KanForwardPath::Direct),
                (DType::F32, KanForwardPath::Direct),
                (DType::F32, KanForwardPath::DirectTf32x3),
            ] {
                rows.push(bench::bench_kan(device, KanPass::Forward, dtype, false, path, shape, reps)?);
            }
        }
    }
    for backward in [false, true].into_iter().filter(|_| wanted("activation")) {
        for dtype in [DType::BF16, DType::F32] {
            let (rows_n, channels) = if device.is_cuda() { (4096, 1024) } else { (64, 256) };
            rows.push(bench::bench_activation(device, backward, dtype, rows_n, channels, 5, 3, reps, copy_gbs)?);
        }
    }
    for (i, &shape) in bench::SCAN_SHAPES.iter().enumerate().filter(|_| wanted("scan")) {
        // The f64 CPU reference is far too slow for these shapes: scale them down there.
        let shape = if device.is_cuda() { shape } else { bench::ScanShape { batch: 1, dim: 16, len: 256, ..shape } };
        let main_shape = i == 0;
        if short && !main_shape {
            continue;
        }
        let passes: &[ScanPass] = if main_shape {
            &[ScanPass::Forward, ScanPass::ForwardForBackward, ScanPass::Backward]
        } else {
            &[ScanPass::Forward, ScanPass::Backward]
        };
        let dtypes: &[DType] = if main_shape { &[DType::BF16, DType::F32, DType::F16] } else { &[DType::BF16] };
        for &pass in passes {
            for &dtype in dtypes {
                rows.push(bench::bench_scan(device, pass, dtype, shape, reps, copy_gbs)?);
            }
        }
        if !device.is_cuda() {
            break;
        }
    }
    if wanted("scan") {
        for batch in [1usize, 64, 256] {
            if short && batch != 64 {
                continue;
            }
            for dtype in [DType::BF16, DType::F32] {
                rows.push(bench::bench_scan_step(device, dtype, batch, reps, copy_gbs)?);
            }
        }
    }
    if wanted("conv") {
        // The scan's shape: Mamba's conv runs on the same (batch, inner dim, len) tensor.
        let shape = if device.is_cuda() { (8, 1536, 2048) } else { (1, 16, 256) };
        for pass in [ConvPass::Forward, ConvPass::Backward] {
            for &dtype in dtypes {
                rows.push(bench::bench_conv(device, pass, dtype, shape, reps, copy_gbs)?);
            }
        }
        for batch in [1usize, 64, 256] {
            if short && batch != 64 {
                continue;
            }
            for dtype in [DType::BF16, DType::F32] {
                rows.push(bench::bench_conv_step(device, dtype, batch, reps, copy_gbs)?);
            }
        }
    }
    if wanted("mlstm") {
        if device.is_cuda() {
            for shape in [MlstmShape::D128, MlstmShape::D256] {
                for dtype in [DType::BF16, DType::F16, DType::F32] {
                    if short && dtype == DType::F16 {
                        continue;
                    }
                    rows.push(bench::bench_mlstm(device, dtype, shape, None, reps, copy_gbs)?);
                }
                rows.push(bench::bench_mlstm_fwd_bwd(device, DType::BF16, shape, reps, copy_gbs)?);
            }
            // Constant tokens (B * NH * S) at D128, bf16; and the other chunk sizes.
            if !short {
                for (batch, heads, len) in [(64, 16, 512), (2, 16, 16384), (1, 8, 65536)] {
                    let shape = MlstmShape { batch, heads, len, head_dim: 128 };
                    rows.push(bench::bench_mlstm(device, DType::BF16, shape, None, reps, copy_gbs)?);
                }
                for chunk in [64, 128] {
                    rows.push(bench::bench_mlstm(device, DType::BF16, MlstmShape::D128, Some(chunk), reps, copy_gbs)?);
                }
            }
        } else {
            let shape = MlstmShape { batch: 1, heads: 2, len: 64, head_dim: 16 };
            rows.push(bench::bench_mlstm(device, DType::F32, shape, None, reps, copy_gbs)?);
            rows.push(bench::bench_mlstm_fwd_bwd(device, DType::F32, shape, reps, copy_gbs)?);
        }
        for batch in [1usize, 64, 256] {
            if (short || !device.is_cuda()) && batch != 64 {
                continue;
            }
            for dtype in [DType::BF16, DType::F32] {
                rows.push(bench::bench_mlstm_step(device, dtype, batch, reps, copy_gbs)?);
            }
        }
    }
    if json {
        println!("{}", to_json(&rows, copy_gbs));
    } else {
        print_table(device, &rows, copy_gbs);
    }
    Ok(())
}

fn print_table(device: &Device, rows: &[BenchRow], copy_gbs: Option<f64>) {
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

fn to_json(rows: &[BenchRow], copy_gbs: Option<f64>) -> String {
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

fn run(device: &Device, opts: &mut Options) -> Result<()> {
    const OPS: &str = "bspline_basis, bspline_basis_derivative, kan_linear, kan_linear_backward, \
                       spline_activation, spline_activation_backward, selective_scan, \
                       selective_scan_backward, causal_conv1d, causal_conv1d_backward, \
                       causal_conv1d_update, mlstm, mlstm_backward or mlstm_step";
    let op = opts.positional.first().cloned().ok_or_else(|| Error::InvalidArgument {
        arg: "OP",
        expected: OPS.into(),
        found: "nothing".into(),
    })?;
    let missing =
        |arg: &'static str| Error::InvalidArgument { arg, expected: "a path".into(), found: "nothing".into() };
    let input = opts.input.take().ok_or_else(|| missing("--input"))?;
    let output = opts.output.take().ok_or_else(|| missing("--output"))?;
    let tensors = load_safetensors(&input, device)?;
    let get = |name: &'static str| required(&tensors, name, &input);
    if op.starts_with("selective_scan") {
        return run_scan(device, &op, &tensors, opts.softplus, &input, &output);
    }
    if op.starts_with("causal_conv1d") {
        return run_conv(device, &op, &tensors, opts.silu, &input, &output);
    }
    if op.starts_with("mlstm") {
        let mode = if opts.constant_normalizer { NormalizerGrad::Constant } else { NormalizerGrad::Exact };
        return run_mlstm(device, &op, &tensors, (opts.chunk, mode), &input, &output);
    }
    let order = opts.order.unwrap_or(3);
    let grid = KnotGrid::from_knots(get("grid")?, order)?;
    let x = get("x")?;
    let outputs: Vec<(&str, Tensor)> = match op.as_str() {
        "bspline_basis" => vec![("out", bspline::bspline_basis(x, &grid)?)],
        "bspline_basis_derivative" => vec![("out", bspline::bspline_basis_derivative(x, &grid)?)],
        "kan_linear" | "kan_linear_backward" => {
            let base = get("base_weight")?.clone();
            let scaler = tensors.get("spline_scaler").cloned();
            let mut cfg = KanLinearConfig::new(grid.in_features(), base.shape().first().copied().unwrap_or(0));
            cfg.spline_order = order;
            cfg.grid_size = grid.n_knots().saturating_sub(2 * order + 1);
            cfg.standalone_scale_spline = scaler.is_some();
            let layer = KanLinear::from_parameters(cfg, grid, base, get("spline_weight")?.clone(), scaler)?;
            if op == "kan_linear" {
                vec![("y", layer.forward(x)?)]
            } else {
                let g = layer.backward(x, get("dy")?)?;
                let mut v = vec![("dx", g.dx), ("d_base_weight", g.base_weight), ("d_spline_weight", g.spline_weight)];
                v.extend(g.spline_scaler.map(|t| ("d_spline_scaler", t)));
                v
            }
        }
        "spline_activation" | "spline_activation_backward" => {
            let act =
                SplineActivation::from_parameters(grid, get("coeff")?.clone(), tensors.get("base_weight").cloned())?;
            if op == "spline_activation" {
                vec![("y", act.forward(x)?)]
            } else {
                let g = act.backward(x, get("dy")?)?;
                let mut v = vec![("dx", g.dx), ("d_coeff", g.coeff)];
                v.extend(g.base_weight.map(|t| ("d_base_weight", t)));
                v
            }
        }
        other => return Err(Error::InvalidArgument { arg: "OP", expected: OPS.into(), found: other.into() }),
    };
    save_outputs(&op, device, ("x", x), &outputs, &output)
}

fn run_scan(
    device: &Device,
    op: &str,
    tensors: &std::collections::HashMap<String, Tensor>,
    softplus: bool,
    input: &str,
    output: &str,
) -> Result<()> {
    let get = |name: &'static str| required(tensors, name, input);
    let inputs = ScanInputs {
        d: tensors.get("D"),
        z: tensors.get("z"),
        delta_bias: tensors.get("delta_bias"),
        delta_softplus: softplus,
        h0: tensors.get("h0"),
        ..ScanInputs::new(get("u")?, get("delta")?, get("A")?, get("B")?, get("C")?)
    };
    let outputs: Vec<(&str, Tensor)> = match op {
        "selective_scan" => {
            let o = selective_scan(&inputs)?;
            vec![("out", o.out), ("last_state", o.last_state)]
        }
        "selective_scan_backward" => {
            let g = selective_scan_backward(&inputs, get("dout")?, tensors.get("dlast_state"), None)?;
            let mut v = vec![("du", g.du), ("ddelta", g.ddelta), ("dA", g.da), ("dB", g.db), ("dC", g.dc)];
            v.extend(g.dd.map(|t| ("dD", t)));
            v.extend(g.dz.map(|t| ("dz", t)));
            v.extend(g.ddelta_bias.map(|t| ("ddelta_bias", t)));
            v.extend(g.dh0.map(|t| ("dh0", t)));
            v
        }
        other => {
            return Err(Error::InvalidArgument {
                arg: "OP",
                expected: "selective_scan or selective_scan_backward".into(),
                found: other.into(),
            })
        }
    };
    save_outputs(op, device, ("u", inputs.u), &outputs, output)
}

fn run_conv(
    device: &Device,
    op: &str,
    tensors: &std::collections::HashMap<String, Tensor>,
    silu: bool,
    input: &str,
    output: &str,
) -> Result<()> {
    let get = |name: &'static str| required(tensors, name, input);
    let x = get("x")?;
    let inputs = ConvInputs {
        bias: tensors.get("bias"),
        initial_state: tensors.get("initial_state"),
        silu,
        ..ConvInputs::new(x, get("weight")?)
    };
    let outputs: Vec<(&str, Tensor)> = match op {
        "causal_conv1d" => {
            let o = causal_conv1d(&inputs)?;
            vec![("out", o.out), ("final_state", o.final_state)]
        }
        "causal_conv1d_backward" => {
            let g = causal_conv1d_backward(&inputs, get("dout")?, tensors.get("dfinal_state"))?;
            let mut v = vec![("dx", g.dx), ("dweight", g.dweight)];
            v.extend(g.dbias.map(|t| ("dbias", t)));
            v.extend(g.dinitial_state.map(|t| ("dinitial_state", t)));
            v
        }
        "causal_conv1d_update" => {
            let mut state = get("state")?.clone();
            let out = causal_conv1d_update(&mut state, x, inputs.weight, inputs.bias, silu)?;
            vec![("out", out), ("state", state)]
        }
        other => {
            return Err(Error::InvalidArgument {
                arg: "OP",
                expected: "causal_conv1d, causal_conv1d_backward or causal_conv1d_update".into(),
                found: other.into(),
            })
        }
    };
    save_outputs(op, device, ("x", x), &outputs, output)
}

/// Tensor `name` of the input file, or an error naming it.
fn required<'a>(
    tensors: &'a std::collections::HashMap<String, Tensor>,
    name: &'static str,
    input: &str,
) -> Result<&'a Tensor> {
    tensors.get(name).ok_or_else(|| Error::InvalidArgument {
        arg: name,
        expected: format!("a tensor `{name}` in {input}"),
        found: "none".into(),
    })
}

/// Writes an op's named outputs to `output` and says what ran on what (`input`: the main
/// input's name and tensor).
fn run_mlstm(
    device: &Device,
    op: &str,
    tensors: &std::collections::HashMap<String, Tensor>,
    (chunk, mode): (Option<usize>, NormalizerGrad),
    input: &str,
    output: &str,
) -> Result<()> {
    let get = |name: &'static str| required(tensors, name, input);
    let state = |c: &str, n: &str, m: &str| -> Option<MlstmState> {
        Some(MlstmState { c: tensors.get(c)?.clone(), n: tensors.get(n)?.clone(), m: tensors.get(m)?.clone() })
    };
    let initial = state("c", "n", "m");
    let q = get("q")?;
    let inputs = MlstmInputs {
        initial: initial.as_ref(),
        chunk,
        ..MlstmInputs::new(q, get("k")?, get("v")?, get("i")?, get("f")?)
    };
    let final_state = |s: MlstmState| vec![("c", s.c), ("n", s.n), ("m", s.m)];
    let outputs: Vec<(&str, Tensor)> = match op {
        "mlstm" => {
            let o = mlstm(&inputs)?;
            let mut v = vec![("h", o.h)];
            v.extend(final_state(o.final_state));
            v
        }
        "mlstm_backward" => {
            let dfinal = state("dc", "dn", "dm");
            let g = mlstm_backward(&inputs, get("dh")?, dfinal.as_ref(), mode, None)?;
            let mut v = vec![("dq", g.dq), ("dk", g.dk), ("dv", g.dv), ("di", g.di), ("df", g.df)];
            if let Some(s) = g.dinitial {
                v.extend([("dc0", s.c), ("dn0", s.n), ("dm0", s.m)]);
            }
            v
        }
        "mlstm_step" => {
            let mut s = initial.clone().ok_or_else(|| Error::InvalidArgument {
                arg: "c, n, m",
                expected: format!("the state in {input}"),
                found: "missing".into(),
            })?;
            let h = mlstm_step(&mut s, q, inputs.k, inputs.v, inputs.i, inputs.f, DEFAULT_EPS)?;
            let mut v = vec![("h", h)];
            v.extend(final_state(s));
            v
        }
        other => {
            return Err(Error::InvalidArgument {
                arg: "OP",
                expected: "mlstm, mlstm_backward or mlstm_step".into(),
                found: other.into(),
            })
        }
    };
    save_outputs(op, device, ("q", q), &outputs, output)
}

fn save_outputs(
    op: &str,
    device: &Device,
    input: (&str, &Tensor),
    outputs: &[(&str, Tensor)],
    output: &str,
) -> Result<()> {
    let refs: Vec<(&str, &Tensor)> = outputs.iter().map(|(n, t)| (*n, t)).collect();
    save_safetensors(output, &refs)?;
    let names: Vec<&str> = outputs.iter().map(|(n, _)| *n).collect();
    let (name, t) = input;
    println!("{op} on {device}: {name} {:?} {} -> {names:?}, written to {output}", t.shape(), t.dtype());
    Ok(())
}
