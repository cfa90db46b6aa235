#!/usr/bin/env bash
# Builds the release test binaries, the benchmarks and the CLI into gpu-bundle/ (git-ignored)
# with a run.sh, so a GPU host without a Rust toolchain runs the whole GPU suite (GPU
# required: nothing skips), the suite under compute-sanitizer, then `check` and `bench`.
#   scripts/gpu-bundle.sh            build gpu-bundle/ (run.sh + payload.tar.xz)
#   gpu-bundle/run.sh                on the GPU host (logs in $OUT or gpu-bundle/out)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bundle=gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle/tests" "$bundle/benches" "$bundle/bin"

executables() { # cargo JSON messages -> "name path" for each executable artifact
  python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["target"]["kind"][0], m["executable"])'
}

cargo build --release --bins
cp target/release/hybrid-kernels "$bundle/bin/"
cargo test --release --no-run --message-format=json 2>/dev/null | executables | while read -r name kind path; do
  case "$kind" in
    test) cp "$path" "$bundle/tests/$name" ;;          # integration tests
    lib) cp "$path" "$bundle/tests/unit-$name" ;;      # the library's unit tests
  esac
done
cargo bench --no-run --message-format=json 2>/dev/null | executables | while read -r name kind path; do
  if [ "$kind" = bench ]; then cp "$path" "$bundle/benches/$name"; fi
done
ls -l "$bundle"/*/
# Every binary embeds all the PTX (~21 MB of text) and they share most of their code: with a
# dictionary larger than one binary (single-threaded, 256 MiB) xz stores the shared bytes
# once, ~650 MB of binaries -> ~5 MB (multi-threaded xz -6 made 49 MB, past the 64 MiB that
# travels to the GPU host with the working tree). It takes about four minutes on two cores.
(cd "$bundle" && tar -cf - tests benches bin | xz -T1 --lzma2=preset=6,dict=256MiB > payload.tar.xz && rm -rf tests benches bin)
cp scripts/bundle-run.sh "$bundle/run.sh"
chmod +x "$bundle/run.sh"
du -sh "$bundle"
