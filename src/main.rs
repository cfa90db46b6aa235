//! `hybrid-kernels`: device info, kernel checks against the CPU references, benchmarks,
//! and running one op on user tensors. With no arguments: `info`, `check`, short `bench`.
//! The ops' check cases, bench rows and `run` commands come from their folders through
//! [`hybrid_kernels::ops::registry`]; this file parses arguments and prints.

use hybrid_kernels::device::{cuda_device_count, driver_available, driver_version};
use hybrid_kernels::kernels::{KernelModule, PTX_ORIGIN};
use hybrid_kernels::ops::registry::{run_command, run_command_names, RunArgs, OPS};
use hybrid_kernels::rng::Rng;
use hybrid_kernels::{bench, check, load_safetensors, save_safetensors, Device, Error, Result, Tensor};
use std::collections::HashMap;
use std::process::ExitCode;

const USAGE: &str = "\
usage: hybrid-kernels [COMMAND] [OPTIONS]

commands:
  info                     devices, driver, compute capability, embedded PTX
  check [--seed N]         every kernel against its f64 CPU reference on random inputs
  bench [GROUP] [--json] [--short]
                           every kernel at standard shapes (CUDA events, median);
                           GROUP (GROUPS) times only that group
  run OP --input IN.safetensors --output OUT.safetensors [OP'S OPTIONS]
                           run one op on your tensors; OP, what IN holds and what
                           OUT gets:
";

const USAGE_TAIL: &str = "  (none)                   info, check and a short bench

options for every command:
  --device cpu|cuda:N      where to run (default: cuda:0 when present, else cpu)
";

fn usage() -> String {
    let groups: Vec<&str> = OPS.iter().map(|op| op.bench_group).collect();
    let mut s = USAGE.replace("GROUPS", &groups.join(", "));
    for op in OPS {
        for c in op.run {
            let opts: Vec<String> = c
                .options
                .iter()
                .map(|o| if o.takes_value { format!("[{} N]", o.name) } else { format!("[{}]", o.name) })
                .collect();
            s += &format!("    {}\n", [c.name.to_string()].into_iter().chain(opts).collect::<Vec<_>>().join(" "));
            s += &wrap(c.usage, 8, 84);
        }
    }
    s + USAGE_TAIL
}

/// `text` folded into lines of at most `width` columns, each indented by `indent`.
fn wrap(text: &str, indent: usize, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && indent + line.len() + 1 + word.len() > width {
            out += &format!("{}{line}\n", " ".repeat(indent));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line += word;
    }
    if !line.is_empty() {
        out += &format!("{}{line}\n", " ".repeat(indent));
    }
    out
}

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
        print!("{}", usage());
        return Ok(true);
    }
    let device = opts.device()?;
    match opts.command.as_deref() {
        None => {
            info(&device)?;
            let ok = check_cmd(&device, opts.seed)?;
            bench_cmd(&device, false, true, None)?;
            Ok(ok)
        }
        Some("info") => info(&device).map(|_| true),
        Some("check") => check_cmd(&device, opts.seed),
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
    seed: Option<u64>,
    json: bool,
    short: bool,
    help: bool,
    /// The options of `run`'s op (`--order 3`, `--softplus`), by name.
    op_options: HashMap<&'static str, String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options> {
        // The options any run command takes, so that their values are not read as positionals.
        let op_options: Vec<_> = OPS.iter().flat_map(|op| op.run.iter().flat_map(|c| c.options.iter())).collect();
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
                "--device" => o.device = Some(value("--device")?),
                "--input" => o.input = Some(value("--input")?),
                "--output" => o.output = Some(value("--output")?),
                "--seed" => o.seed = Some(parse_num("--seed", &value("--seed")?)?),
                s if s.starts_with('-') => match op_options.iter().find(|opt| opt.name == s) {
                    Some(opt) => {
                        let v = if opt.takes_value { value(opt.name)? } else { String::new() };
                        o.op_options.insert(opt.name, v);
                    }
                    None => {
                        return Err(Error::InvalidArgument {
                            arg: "option",
                            expected: "see --help".into(),
                            found: s.into(),
                        })
                    }
                },
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
        println!("  module {:<24} PTX ISA {}, runs on sm_{ma}{mi}+{sm90}", m.name(), m.ptx_isa());
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

fn check_cmd(device: &Device, seed: Option<u64>) -> Result<bool> {
    let mut rng = seed.map_or_else(Rng::from_time, Rng::new);
    let seed_used = rng.clone().next_u64();
    println!("== check on {device} (inputs seeded {seed_used:#x}; every output NaN-poisoned before launch)");
    if !device.is_cuda() {
        println!("(CPU path: the CPU backend against the f64 reference; only output rounding is measured)");
    }
    let rows = check::run_all(device, &mut rng, true)?;
    let all_ok = rows.iter().all(|r| r.passed());
    println!("check: {}\n", if all_ok { "all kernels pass" } else { "FAILURES above" });
    Ok(all_ok)
}

fn bench_cmd(device: &Device, json: bool, short: bool, group: Option<&str>) -> Result<()> {
    if std::env::var("HYBRID_KERNELS_POISON").is_ok_and(|v| !v.is_empty() && v != "0") {
        eprintln!(
            "warning: HYBRID_KERNELS_POISON is set: every output allocation is filled with NaN bytes first, \
             and the timings below include those fills; unset it to benchmark"
        );
    }
    let (rows, copy_gbs) = bench::run_all(device, short, group)?;
    if json {
        println!("{}", bench::to_json(&rows, copy_gbs));
    } else {
        bench::print_table(device, &rows, copy_gbs);
    }
    Ok(())
}

fn run(device: &Device, opts: &mut Options) -> Result<()> {
    let names = || run_command_names().join(", ");
    let op = opts.positional.first().cloned().ok_or_else(|| Error::InvalidArgument {
        arg: "OP",
        expected: names(),
        found: "nothing".into(),
    })?;
    let command =
        run_command(&op).ok_or_else(|| Error::InvalidArgument { arg: "OP", expected: names(), found: op.clone() })?;
    if let Some(extra) = opts.op_options.keys().find(|k| !command.options.iter().any(|o| o.name == **k)) {
        let takes: Vec<&str> = command.options.iter().map(|o| o.name).collect();
        return Err(Error::InvalidArgument {
            arg: "option",
            expected: if takes.is_empty() { format!("no options for {op}") } else { takes.join(", ") },
            found: (*extra).into(),
        });
    }
    let missing =
        |arg: &'static str| Error::InvalidArgument { arg, expected: "a path".into(), found: "nothing".into() };
    let input = opts.input.take().ok_or_else(|| missing("--input"))?;
    let output = opts.output.take().ok_or_else(|| missing("--output"))?;
    check_output_path(&input, &output)?;
    let tensors = load_safetensors(&input, device)?;
    let args = RunArgs { device, input_path: &input, tensors: &tensors, options: &opts.op_options };
    let outputs = (command.run)(&args)?;
    let main = args.required(command.main_input)?;
    save_outputs(&op, device, (command.main_input, main), &outputs, &output)
}

/// Before anything runs: `--output` must name a file in an existing folder, and not the
/// input (writing it would replace the input with the op's outputs).
fn check_output_path(input: &str, output: &str) -> Result<()> {
    let bad =
        |expected: &str, found: String| Error::InvalidArgument { arg: "--output", expected: expected.into(), found };
    let out = std::path::Path::new(output);
    let same = output == input
        || matches!((std::fs::canonicalize(input), std::fs::canonicalize(out)), (Ok(a), Ok(b)) if a == b);
    if same {
        return Err(bad("a file other than --input (the input would be replaced)", output.into()));
    }
    if out.is_dir() || out.file_name().is_none() {
        return Err(bad("a file path", format!("{output} (a folder)")));
    }
    let folder = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !folder.is_dir() {
        return Err(bad("a file in an existing folder", format!("{output} (no folder {})", folder.display())));
    }
    Ok(())
}

/// Writes an op's named outputs to `output` and says what ran on what (`input`: the main
/// input's name and tensor).
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
