#!/usr/bin/env bash
# Regenerates or checks the committed ptx/ from cuda/, with the flags in cuda/nvcc-flags.txt
# (the same ones build.rs uses): one module per source, ptx/<op>.ptx for cuda/<op>.cu and
# ptx/<op>/<pass>.ptx for cuda/<op>/<pass>.cu, plus <module>.sm90.ptx (-arch=compute_90)
# for the modules named in cuda/sm90-variants.txt. The nvcc runs go in parallel.
#   scripts/ptx.sh regen   write the PTX of every module
#   scripts/ptx.sh check   fail when ptx/ differs from what cuda/ compiles to
# nvcc: $HYBRID_KERNELS_NVCC, else the one scripts/install-nvcc.sh installs (it runs it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mode=${1:-}
case "$mode" in regen|check) ;; *) echo "usage: $0 regen|check" >&2; exit 2 ;; esac
nvcc=${HYBRID_KERNELS_NVCC:-$(scripts/install-nvcc.sh)}
mapfile -t flags < <(sed -e 's/#.*//' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' cuda/nvcc-flags.txt | grep -v '^$')
mapfile -t sm90 < <(sed -e 's/#.*//' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' cuda/sm90-variants.txt | grep -v '^$')
flags90=()
for f in "${flags[@]}"; do case "$f" in -arch=*) flags90+=(-arch=compute_90) ;; *) flags90+=("$f") ;; esac; done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
outputs=()
pids=()
for src in cuda/*.cu cuda/*/*.cu; do
  [ -e "$src" ] || continue
  module=${src#cuda/}
  module=${module%.cu}
  mkdir -p "$tmp/$(dirname "$module")"
  "$nvcc" "${flags[@]}" "$src" -o "$tmp/$module.ptx" &
  pids+=($!)
  outputs+=("$module.ptx")
  for s in "${sm90[@]}"; do
    if [ "$s" = "$module" ]; then
      "$nvcc" "${flags90[@]}" "$src" -o "$tmp/$module.sm90.ptx" &
      pids+=($!)
      outputs+=("$module.sm90.ptx")
    fi
  done
done
for pid in "${pids[@]}"; do
  wait "$pid" || { echo "nvcc failed (see above)" >&2; exit 1; }
done
for out in "${outputs[@]}"; do
  if [ "$mode" = regen ]; then
    mkdir -p "ptx/$(dirname "$out")"
    cp "$tmp/$out" "ptx/$out"
    echo "wrote ptx/$out ($(grep -m1 '^\.version' "ptx/$out"))"
  elif ! cmp -s "$tmp/$out" "ptx/$out"; then
    echo "STALE: ptx/$out differs from what cuda/ compiles to; run scripts/ptx.sh regen" >&2
    diff <(head -c 100000 "ptx/$out" 2>/dev/null) <(head -c 100000 "$tmp/$out") | head -20 >&2 || true
    status=1
  fi
done
for ptx in ptx/*.ptx ptx/*/*.ptx; do
  [ -e "$ptx" ] || continue
  module=${ptx#ptx/}
  module=${module%.ptx}
  module=${module%.sm90}
  if [ ! -e "cuda/$module.cu" ]; then
    echo "STALE: $ptx has no source in cuda/" >&2
    status=1
  fi
done
[ "$mode" = check ] && [ $status = 0 ] && echo "ptx/ is up to date with cuda/"
exit $status
