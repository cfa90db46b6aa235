//! The CLI's `check`: every op's check rows ([`crate::ops::registry::OPS`]) on fresh random
//! inputs, printed as a table. The cases themselves live with their ops (`ops/<op>/check.rs`),
//! the error measures and tolerances in [`crate::measure`], the PRNG in [`crate::rng`]; the
//! names below are re-exported from there for the test suites and earlier callers.

use crate::device::Device;
use crate::error::Result;
use crate::ops::registry::OPS;

pub use crate::measure::{
    optional_error, relative_error, relative_error_in, rounding_tolerance, scaled_error, tensor_error, unit_roundoff,
    CheckRow,
};
pub use crate::ops::bspline::check::{random_inputs, random_knots, tolerance, BasisCase, GridLayout};
pub use crate::ops::causal_conv1d::check::{conv_tolerance, decode_against_conv, ConvCase, ConvTensors};
pub use crate::ops::kan::check::{kan_tolerance, KanCase, KanErrors};
pub use crate::ops::mlstm::check::{
    decode_against_mlstm, mlstm_grad_conditioning, mlstm_grad_tolerance, mlstm_tolerance, MlstmCase, MlstmTensors,
};
pub use crate::ops::selective_scan::check::{decode_against_scan, scan_tolerance, ScanCase, ScanTensors};
pub use crate::ops::spline_activation::check::ActivationCase;
pub use crate::rng::Rng;

/// Runs every op's check rows on `device` with inputs drawn from `rng`; with `print`, prints
/// the table as the rows come. Returns the rows (see [`CheckRow::passed`]).
pub fn run_all(device: &Device, rng: &mut Rng, print: bool) -> Result<Vec<CheckRow>> {
    if print {
        println!("{:<28} {:<6} {:>7} {:>12} {:>10}  result", "kernel", "dtype", "cases", "max rel err", "tolerance");
    }
    let mut rows = Vec::new();
    for op in OPS {
        for row in (op.check)(device, rng)? {
            if print {
                println!(
                    "{:<28} {:<6} {:>7} {:>12.3e} {:>10.1e}  {}",
                    row.kernel,
                    row.dtype,
                    row.cases,
                    row.worst,
                    row.tolerance,
                    if row.passed() { "pass" } else { "FAIL" }
                );
            }
            rows.push(row);
        }
    }
    Ok(rows)
}
