#!/usr/bin/env bash
# Installs the CUDA 13.0 nvcc from PyPI wheels into .cuda-toolchain/ (git-ignored), for
# machines without a CUDA toolkit. No GPU or driver is needed to compile PTX.
# Prints the nvcc path last. The versions are pinned: the committed ptx/ is compared
# byte for byte with what this nvcc produces (scripts/ptx.sh check).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${HYBRID_KERNELS_TOOLCHAIN_DIR:-$root/.cuda-toolchain}
nvcc=$dest/nvidia/cu13/bin/nvcc
if [ -x "$nvcc" ] && "$nvcc" --version 2>/dev/null | grep -q "V13.0.88"; then
  echo "$nvcc"
  exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target "$dest" \
  "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
  "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" >&2
"$nvcc" --version >&2
echo "$nvcc"
