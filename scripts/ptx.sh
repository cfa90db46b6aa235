#!/usr/bin/env bash
# Regenerates or checks the committed ptx/ from cuda/, with the flags in cuda/nvcc-flags.txt
# (the same ones build.rs uses).
#   scripts/ptx.sh regen   write ptx/<op>.ptx for every cuda/<op>.cu
#   scripts/ptx.sh check   fail when ptx/ differs from what cuda/ compiles to
# nvcc: $HYBRID_KERNELS_NVCC, else the one scripts/install-nvcc.sh installs (it runs it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mode=${1:-}
case "$mode" in regen|check) ;; *) echo "usage: $0 regen|check" >&2; exit 2 ;; esac
nvcc=${HYBRID_KERNELS_NVCC:-$(scripts/install-nvcc.sh)}
mapfile -t flags < <(sed -e 's/#.*//' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' cuda/nvcc-flags.txt | grep -v '^$')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for src in cuda/*.cu; do
  name=$(basename "$src" .cu)
  "$nvcc" "${flags[@]}" "$src" -o "$tmp/$name.ptx"
  if [ "$mode" = regen ]; then
    cp "$tmp/$name.ptx" "ptx/$name.ptx"
    echo "wrote ptx/$name.ptx ($(grep -m1 '^\.version' "ptx/$name.ptx"))"
  elif ! cmp -s "$tmp/$name.ptx" "ptx/$name.ptx"; then
    echo "STALE: ptx/$name.ptx differs from what $src compiles to; run scripts/ptx.sh regen" >&2
    diff <(head -c 100000 "ptx/$name.ptx" 2>/dev/null) <(head -c 100000 "$tmp/$name.ptx") | head -20 >&2 || true
    status=1
  fi
done
for ptx in ptx/*.ptx; do
  [ -e "$ptx" ] || continue
  if [ ! -e "cuda/$(basename "$ptx" .ptx).cu" ]; then
    echo "STALE: $ptx has no source in cuda/" >&2
    status=1
  fi
done
[ "$mode" = check ] && [ $status = 0 ] && echo "ptx/ is up to date with cuda/"
exit $status
