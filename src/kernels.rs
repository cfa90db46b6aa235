//! The kernel modules embedded in the library: one per `cuda/<op>.cu` or
//! `cuda/<op>/<pass>.cu`, compiled to PTX by build.rs (or taken from the committed `ptx/`),
//! loaded lazily per device and cached; and the one naming rule of their kernels.

use crate::dtype::DType;

/// How the embedded PTX was produced: `nvcc <version> (<path>)` or `committed ptx/`.
pub const PTX_ORIGIN: &str = env!("HYBRID_KERNELS_PTX_ORIGIN");

/// The kernel modules: `cuda/<name>.cu` compiled to `<name>.ptx`, `<name>` either `<op>` or
/// `<op>/<pass>` (one module per pass of the big kernels, so that, say, decoding loads only
/// the step's PTX). Adding a module is its source file and one line here.
macro_rules! kernel_modules {
    ($($variant:ident => $name:literal,)*) => {
        /// A typed id for each kernel module; [`crate::device::CudaDevice`] loads each once.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum KernelModule {
            $($variant,)*
        }

        impl KernelModule {
            pub const ALL: &'static [KernelModule] = &[$(KernelModule::$variant,)*];

            /// The source path below `cuda/` without `.cu` (`bspline`, `mlstm/step`); the
            /// committed PTX is `ptx/<name>.ptx`.
            pub fn name(self) -> &'static str {
                match self {
                    $(KernelModule::$variant => $name,)*
                }
            }

            pub fn ptx(self) -> &'static str {
                match self {
                    $(KernelModule::$variant => include_str!(concat!(env!("OUT_DIR"), "/", $name, ".ptx")),)*
                }
            }
        }
    };
}

kernel_modules! {
    Bspline => "bspline",
    Kan => "kan",
    KanDirect => "kan_direct",
    SplineActivation => "spline_activation",
    CausalConv1d => "causal_conv1d",
    SelectiveScanForward => "selective_scan/forward",
    SelectiveScanBackward => "selective_scan/backward",
    SelectiveScanStep => "selective_scan/step",
    MlstmForwardChunked => "mlstm/forward_chunked",
    MlstmForwardFused => "mlstm/forward_fused",
    MlstmStep => "mlstm/step",
    MlstmBackward => "mlstm/backward",
    MlstmBackwardFused => "mlstm/backward_fused",
    Norm => "norm",
    Elementwise => "elementwise",
    CrossEntropy => "cross_entropy",
    Embedding => "embedding",
    Adamw => "adamw",
}

/// Asserts at compile time that the host mirror of a kernel parameter struct is `$fields`
/// 4-byte fields with no padding, as `HK_PARAMS_LAYOUT` in cuda/common.cuh asserts of the C
/// struct: the two sides then agree byte for byte, which the launches' `DeviceRepr` relies on.
macro_rules! assert_kernel_params {
    ($t:ty, $fields:expr) => {
        const _: () = assert!(
            std::mem::size_of::<$t>() == 4 * $fields && std::mem::align_of::<$t>() == 4,
            concat!(stringify!($t), " must be ", stringify!($fields), " 4-byte fields, as its C mirror")
        );
    };
}
pub(crate) use assert_kernel_params;

/// The position of `dtype` in kernel-name tables indexed by element type: f32, bf16, f16.
pub const fn dtype_index(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

/// The name of a kernel instantiated per element type: `<op>_<variant>_<dtype><suffix>`
/// (`selective_scan_fwd_bf16_s4_l16`: op `selective_scan`, variant `fwd`, suffix
/// `_s4_l16`), the one rule every `extern "C"` kernel of `cuda/` is named by.
pub fn kernel_name(op: &str, variant: &str, dtype: DType, suffix: &str) -> String {
    format!("{op}_{variant}_{}{suffix}", dtype.as_str())
}

impl KernelModule {
    /// The module's compute_90 build (cuda/sm90-variants.txt), which devices of compute
    /// capability 9.0 and up load instead of [`KernelModule::ptx`].
    pub fn ptx_sm90(self) -> Option<&'static str> {
        match self {
            KernelModule::KanDirect => Some(include_str!(concat!(env!("OUT_DIR"), "/kan_direct.sm90.ptx"))),
            _ => None,
        }
    }

    /// The PTX a device of compute capability `cc` loads.
    pub fn ptx_for(self, cc: (i32, i32)) -> &'static str {
        match self.ptx_sm90() {
            Some(ptx) if cc >= (9, 0) => ptx,
            _ => self.ptx(),
        }
    }

    /// Whether the module loaded on a device of compute capability `cc` has its compute_90
    /// kernels, whose launches may use programmatic stream serialization.
    pub fn programmatic_launch(self, cc: (i32, i32)) -> bool {
        cc >= (9, 0) && self.ptx_sm90().is_some()
    }

    /// Oldest compute capability the module's PTX target runs on (`.target sm_80`).
    pub fn min_compute_capability(self) -> (i32, i32) {
        let target = self.ptx_directive(".target").unwrap_or("sm_80");
        parse_sm(target).unwrap_or((8, 0))
    }

    /// True for architecture-specific targets (`sm_90a`): such PTX runs only on exactly
    /// that compute capability, not on later ones.
    pub fn arch_specific(self) -> bool {
        self.ptx_directive(".target").is_some_and(|t| t.ends_with('a'))
    }

    /// Whether the module can load on a device of compute capability `cc`.
    pub fn runs_on(self, cc: (i32, i32)) -> bool {
        let min = self.min_compute_capability();
        if self.arch_specific() {
            cc == min
        } else {
            cc >= min
        }
    }

    /// The PTX ISA version (`.version 9.0`), which decides the oldest driver that loads it.
    pub fn ptx_isa(self) -> &'static str {
        self.ptx_directive(".version").unwrap_or("unknown")
    }

    fn ptx_directive(self, directive: &str) -> Option<&'static str> {
        self.ptx()
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(directive))
            .map(|rest| rest.split([',', ' ']).find(|s| !s.is_empty()).unwrap_or(""))
    }
}

/// `sm_80` / `sm_90a` → (8, 0) / (9, 0).
fn parse_sm(target: &str) -> Option<(i32, i32)> {
    let digits: String = target.strip_prefix("sm_")?.chars().take_while(char::is_ascii_digit).collect();
    let n: i32 = digits.parse().ok()?;
    Some((n / 10, n % 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// build.rs lists the sources it compiled; both lists are embedded at compile time, so
    /// the test passes wherever its binary runs.
    #[test]
    fn every_cuda_source_has_a_module_id() {
        let mut sources: Vec<&str> = include_str!(concat!(env!("OUT_DIR"), "/modules.txt")).lines().collect();
        sources.sort();
        let mut ids: Vec<&str> = KernelModule::ALL.iter().map(|m| m.name()).collect();
        ids.sort();
        assert_eq!(sources, ids);
    }

    #[test]
    fn sm90_variants_are_the_listed_sources_and_target_hopper() {
        let list = include_str!("../cuda/sm90-variants.txt");
        let mut listed: Vec<&str> =
            list.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()).collect();
        listed.sort();
        let mut with_variant: Vec<&str> =
            KernelModule::ALL.iter().filter(|m| m.ptx_sm90().is_some()).map(|m| m.name()).collect();
        with_variant.sort();
        assert_eq!(listed, with_variant);
        for m in KernelModule::ALL {
            if let Some(ptx) = m.ptx_sm90() {
                assert!(ptx.lines().any(|l| l.trim() == ".target sm_90"), "{m:?}");
                assert_eq!(m.ptx_for((9, 0)), ptx);
                assert_eq!(m.ptx_for((8, 6)), m.ptx());
                assert!(m.programmatic_launch((9, 0)) && !m.programmatic_launch((8, 9)));
            } else {
                assert_eq!(m.ptx_for((9, 0)), m.ptx());
                assert!(!m.programmatic_launch((9, 0)));
            }
        }
    }

    #[test]
    fn kernel_names_follow_the_one_rule_and_exist() {
        assert_eq!(kernel_name("mlstm", "step", DType::BF16, ""), "mlstm_step_bf16");
        assert_eq!(kernel_name("selective_scan", "fwd", DType::F16, "_s4_l16"), "selective_scan_fwd_f16_s4_l16");
        assert_eq!(DType::ALL.map(dtype_index), [0, 1, 2]);
        let entry = |m: KernelModule, name: &str| m.ptx().contains(&format!(".entry {name}("));
        assert!(entry(KernelModule::MlstmStep, &kernel_name("mlstm", "step", DType::F16, "")));
        assert!(entry(
            KernelModule::SelectiveScanForward,
            &kernel_name("selective_scan", "fwd", DType::BF16, "_s4_l16")
        ));
        assert!(!entry(KernelModule::MlstmForwardFused, "mlstm_fwd_fused_bf16_k128_stats"));
        assert!(entry(KernelModule::MlstmBackwardFused, "mlstm_fwd_fused_bf16_k128_stats"));
    }

    #[test]
    fn embedded_ptx_targets_ampere_and_names_its_isa() {
        for m in KernelModule::ALL {
            assert_eq!(m.min_compute_capability(), (8, 0), "{m:?}");
            let isa = m.ptx_isa();
            assert!(isa.split('.').all(|p| p.parse::<u32>().is_ok()), "{m:?}: {isa}");
        }
        assert_eq!(parse_sm("sm_90a"), Some((9, 0)));
        assert!(KernelModule::Bspline.runs_on((8, 0)) && KernelModule::Bspline.runs_on((10, 0)));
        assert!(!KernelModule::Bspline.runs_on((7, 5)));
    }
}
