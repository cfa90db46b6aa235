//! Compiles every `cuda/*.cu` and `cuda/<op>/*.cu` (one module per file) to PTX with nvcc
//! when one is found, in parallel, otherwise embeds the committed `ptx/*.ptx` and
//! `ptx/<op>/*.ptx`. Writes only into OUT_DIR, with `modules.txt` listing the module names
//! (`bspline`, `mlstm/forward_fused`) for the tests that compare it with the registry. An nvcc that is found but fails is a
//! hard error with nvcc's own output: a silent fallback would ship PTX that no longer
//! matches the sources.
//!
//! nvcc is looked for, in order: $HYBRID_KERNELS_NVCC, `nvcc` on $PATH,
//! $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc. HYBRID_KERNELS_USE_COMMITTED_PTX=1 (and
//! docs.rs, which sets DOCS_RS) skip the search. The flags live in cuda/nvcc-flags.txt,
//! shared with scripts/ptx.sh, which regenerates and checks the committed PTX. The sources
//! named in cuda/sm90-variants.txt are compiled a second time for compute_90 into
//! `<stem>.sm90.ptx`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

const ENV_VARS: &[&str] =
    &["HYBRID_KERNELS_NVCC", "HYBRID_KERNELS_USE_COMMITTED_PTX", "DOCS_RS", "PATH", "CUDA_HOME", "CUDA_PATH"];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cuda_dir = manifest.join("cuda");
    let ptx_dir = manifest.join("ptx");
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=ptx");
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let modules = cuda_modules(&cuda_dir);
    let sm90 = read_flags(&cuda_dir.join("sm90-variants.txt"));
    for name in &sm90 {
        if !modules.contains(name) {
            fail(&format!("cuda/sm90-variants.txt names {name}, which has no cuda/{name}.cu"));
        }
    }
    for module in &modules {
        if let Some((op, _)) = module.split_once('/') {
            fs::create_dir_all(out_dir.join(op))
                .unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", out_dir.join(op).display())));
        }
    }
    let origin = match find_nvcc() {
        Some(nvcc) => {
            let flags = read_flags(&cuda_dir.join("nvcc-flags.txt"));
            let flags90: Vec<String> = flags
                .iter()
                .map(|f| if f.starts_with("-arch=") { "-arch=compute_90".into() } else { f.clone() })
                .collect();
            let mut jobs: Vec<(PathBuf, &[String], PathBuf)> = Vec::new();
            for module in &modules {
                let src = cuda_dir.join(format!("{module}.cu"));
                jobs.push((src.clone(), &flags, out_dir.join(format!("{module}.ptx"))));
                if sm90.contains(module) {
                    jobs.push((src, &flags90, out_dir.join(format!("{module}.sm90.ptx"))));
                }
            }
            // One nvcc per source at once: the big modules take most of a minute each.
            std::thread::scope(|scope| {
                for (src, flags, out) in &jobs {
                    let nvcc = &nvcc;
                    scope.spawn(move || compile(nvcc, flags, src, out));
                }
            });
            format!("nvcc {} ({})", nvcc_release(&nvcc), nvcc.display())
        }
        None => {
            let mut names: Vec<String> = modules.iter().map(|m| format!("{m}.ptx")).collect();
            names.extend(sm90.iter().map(|s| format!("{s}.sm90.ptx")));
            for name in &names {
                let committed = ptx_dir.join(name);
                if let Err(e) = fs::copy(&committed, out_dir.join(name)) {
                    fail(&format!(
                        "no nvcc found and the committed {} cannot be read ({e}); regenerate it with \
                         scripts/ptx.sh regen, or point HYBRID_KERNELS_NVCC at an nvcc",
                        committed.display()
                    ));
                }
            }
            "committed ptx/".to_string()
        }
    };
    let listing: String = modules.iter().map(|m| format!("{m}\n")).collect();
    fs::write(out_dir.join("modules.txt"), listing).unwrap_or_else(|e| fail(&format!("cannot write modules.txt: {e}")));
    println!("cargo:rustc-env=HYBRID_KERNELS_PTX_ORIGIN={origin}");
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    exit(1);
}

/// The module names: `<stem>` for each `cuda/<stem>.cu`, `<op>/<stem>` for each
/// `cuda/<op>/<stem>.cu`, sorted.
fn cuda_modules(dir: &Path) -> Vec<String> {
    let list = |d: &Path| -> Vec<PathBuf> {
        let entries = fs::read_dir(d).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", d.display())));
        entries.filter_map(|e| e.ok().map(|e| e.path())).collect()
    };
    let stem = |p: &Path| p.file_stem().expect("a .cu file has a stem").to_string_lossy().into_owned();
    let is_cu = |p: &Path| p.extension().is_some_and(|x| x == "cu");
    let mut v = Vec::new();
    for path in list(dir) {
        if path.is_dir() {
            let op = path.file_name().expect("a folder has a name").to_string_lossy().into_owned();
            v.extend(list(&path).iter().filter(|p| is_cu(p)).map(|p| format!("{op}/{}", stem(p))));
        } else if is_cu(&path) {
            v.push(stem(&path));
        }
    }
    v.sort();
    v
}

fn env_flag(name: &str) -> bool {
    env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn find_nvcc() -> Option<PathBuf> {
    if env_flag("HYBRID_KERNELS_USE_COMMITTED_PTX") || env::var_os("DOCS_RS").is_some() {
        return None;
    }
    if let Some(p) = env::var_os("HYBRID_KERNELS_NVCC") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            fail(&format!("HYBRID_KERNELS_NVCC={} is not a file", p.display()));
        }
        return Some(p);
    }
    if let Some(path) = env::var_os("PATH") {
        if let Some(p) = env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file()) {
            return Some(p);
        }
    }
    ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .find(|p| p.is_file())
}

fn read_flags(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", path.display())));
    text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()).map(String::from).collect()
}

fn compile(nvcc: &Path, flags: &[String], src: &Path, out: &Path) {
    let output = Command::new(nvcc)
        .args(flags)
        .arg(src)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", nvcc.display())));
    if !output.status.success() {
        fail(&format!(
            "nvcc failed on {} ({}):\n{}{}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
}

fn nvcc_release(nvcc: &Path) -> String {
    let out = Command::new(nvcc).arg("--version").output().ok();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.lines()
        .find_map(|l| l.split(", V").nth(1))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "unknown version".into())
}
