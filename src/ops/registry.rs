//! The list of ops the CLI's `check`, `bench` and `run` loop over. Each op's folder provides
//! its own check cases (`check.rs`), bench rows (`bench.rs`) and `run` handlers (`cli.rs`);
//! adding an op is its folder, its kernel module ids and one line in [`OPS`].

use crate::device::Device;
use crate::error::{Error, Result};
use crate::measure::CheckRow;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::timing::{BenchContext, BenchRow};
use std::collections::HashMap;

/// One op as the CLI sees it.
pub struct OpEntry {
    /// The op's folder under `src/ops/`.
    pub name: &'static str,
    /// The name `bench GROUP` selects it by.
    pub bench_group: &'static str,
    /// Every check row of the op: its kernels against the f64 reference on random inputs
    /// drawn from `rng`, on `device`.
    pub check: fn(&Device, &mut Rng) -> Result<Vec<CheckRow>>,
    /// Every bench row of the op (full or short table, by the context).
    pub bench: fn(&BenchContext) -> Result<Vec<BenchRow>>,
    /// The op's `run` commands.
    pub run: &'static [RunCommand],
}

/// Every op, in the order of the CLI's tables.
pub const OPS: &[OpEntry] = &[
    super::bspline::ENTRY,
    super::kan::ENTRY,
    super::spline_activation::ENTRY,
    super::selective_scan::ENTRY,
    super::causal_conv1d::ENTRY,
    super::mlstm::ENTRY,
    super::norm::ENTRY,
    super::elementwise::ENTRY,
    super::embedding::ENTRY,
    super::cross_entropy::ENTRY,
    super::adamw::ENTRY,
];

/// What a run command returns: its outputs, by the names they are written under.
pub type RunOutputs = Vec<(&'static str, Tensor)>;

/// One `hybrid-kernels run NAME` command: an op applied to the tensors of a safetensors file.
pub struct RunCommand {
    pub name: &'static str,
    /// The tensor named in the run's summary line (the op's main input).
    pub main_input: &'static str,
    /// The options it takes beyond `--input`, `--output` and `--device`.
    pub options: &'static [RunOption],
    /// What it reads and writes, for `--help`.
    pub usage: &'static str,
    pub run: fn(&RunArgs) -> Result<RunOutputs>,
}

/// An option of a run command: `--name VALUE`, or `--name` alone when `takes_value` is false.
#[derive(Clone, Copy, Debug)]
pub struct RunOption {
    pub name: &'static str,
    pub takes_value: bool,
}

/// What a run command is given: the device, the input file's tensors and the options.
pub struct RunArgs<'a> {
    pub device: &'a Device,
    pub input_path: &'a str,
    pub tensors: &'a HashMap<String, Tensor>,
    /// Option name (`--order`) to its value; flags map to an empty string.
    pub options: &'a HashMap<&'static str, String>,
}

impl RunArgs<'_> {
    /// Tensor `name` of the input file, or an error naming it.
    pub fn required(&self, name: &'static str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::InvalidArgument {
            arg: name,
            expected: format!("a tensor `{name}` in {}", self.input_path),
            found: "none".into(),
        })
    }

    /// Tensor `name` of the input file, if it has one.
    pub fn optional(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Whether flag `name` was given.
    pub fn flag(&self, name: &'static str) -> bool {
        self.options.contains_key(name)
    }

    /// The value of option `name` parsed as a non-negative integer, if it was given.
    pub fn number(&self, name: &'static str) -> Result<Option<usize>> {
        self.options
            .get(name)
            .map(|s| {
                s.parse().map_err(|_| Error::InvalidArgument {
                    arg: name,
                    expected: "a non-negative integer".into(),
                    found: s.clone(),
                })
            })
            .transpose()
    }
}

/// The run command called `name`, with the op it belongs to.
pub fn run_command(name: &str) -> Option<&'static RunCommand> {
    OPS.iter().flat_map(|op| op.run.iter()).find(|c| c.name == name)
}

/// Every run command's name, for error messages and `--help`.
pub fn run_command_names() -> Vec<&'static str> {
    OPS.iter().flat_map(|op| op.run.iter().map(|c| c.name)).collect()
}

/// The op whose bench group is `group`.
pub fn bench_group(group: &str) -> Option<&'static OpEntry> {
    OPS.iter().find(|op| op.bench_group == group)
}
