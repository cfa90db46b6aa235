//! The kernel modules embedded in the library: one per `cuda/<op>.cu`, compiled to PTX by
//! build.rs (or taken from the committed `ptx/`), loaded lazily per device and cached.

/// How the embedded PTX was produced: `nvcc <version> (<path>)` or `committed ptx/`.
pub const PTX_ORIGIN: &str = env!("HYBRID_KERNELS_PTX_ORIGIN");

/// A typed id for each kernel module; [`crate::device::CudaDevice`] loads each once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelModule {
    Bspline,
    Kan,
    KanDirect,
    SplineActivation,
    SelectiveScan,
    CausalConv1d,
    Mlstm,
}

impl KernelModule {
    pub const ALL: &'static [KernelModule] = &[
        KernelModule::Bspline,
        KernelModule::Kan,
        KernelModule::KanDirect,
        KernelModule::SplineActivation,
        KernelModule::SelectiveScan,
        KernelModule::CausalConv1d,
        KernelModule::Mlstm,
    ];

    /// The source stem: `cuda/<name>.cu`, `ptx/<name>.ptx`.
    pub fn name(self) -> &'static str {
        match self {
            KernelModule::Bspline => "bspline",
            KernelModule::Kan => "kan",
            KernelModule::KanDirect => "kan_direct",
            KernelModule::SplineActivation => "spline_activation",
            KernelModule::SelectiveScan => "selective_scan",
            KernelModule::CausalConv1d => "causal_conv1d",
            KernelModule::Mlstm => "mlstm",
        }
    }

    pub fn ptx(self) -> &'static str {
        match self {
            KernelModule::Bspline => include_str!(concat!(env!("OUT_DIR"), "/bspline.ptx")),
            KernelModule::Kan => include_str!(concat!(env!("OUT_DIR"), "/kan.ptx")),
            KernelModule::KanDirect => include_str!(concat!(env!("OUT_DIR"), "/kan_direct.ptx")),
            KernelModule::SplineActivation => include_str!(concat!(env!("OUT_DIR"), "/spline_activation.ptx")),
            KernelModule::SelectiveScan => include_str!(concat!(env!("OUT_DIR"), "/selective_scan.ptx")),
            KernelModule::CausalConv1d => include_str!(concat!(env!("OUT_DIR"), "/causal_conv1d.ptx")),
            KernelModule::Mlstm => include_str!(concat!(env!("OUT_DIR"), "/mlstm.ptx")),
        }
    }

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

    #[test]
    fn every_cuda_source_has_a_module_id() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
        let mut stems: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let p = e.unwrap().path();
                (p.extension()? == "cu").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
            })
            .collect();
        stems.sort();
        let mut ids: Vec<String> = KernelModule::ALL.iter().map(|m| m.name().to_string()).collect();
        ids.sort();
        assert_eq!(stems, ids);
    }

    #[test]
    fn sm90_variants_are_the_listed_sources_and_target_hopper() {
        let list = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda").join("sm90-variants.txt"),
        )
        .unwrap();
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
