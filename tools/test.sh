#!/usr/bin/env bash
# Set up (or reuse) .venv, run the checks CI runs, then the tests (.ci/run calls this).
#
#   ./tools/test.sh                   ruff check, ruff format --check, mypy bigmerge, then every test
#   ./tools/test.sh --fast            the same checks, then the development tier: no mpi, s3 or slow
#                                     tests (pytest -m "not slow and not mpi and not s3"; under 3 min)
#   ./tools/test.sh --no-lint ARGS    tests only, e.g. ./tools/test.sh --no-lint tests/test_merge.py -x
#
# Other arguments go to pytest. The markers are registered in pyproject.toml.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./tools/setup_env.sh
FAST=0
LINT=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --fast) FAST=1; shift ;;
    --no-lint) LINT=0; shift ;;
    *) break ;;
  esac
done
if [[ $LINT == 1 ]]; then
  .venv/bin/ruff check .
  .venv/bin/ruff format --check .
  .venv/bin/mypy bigmerge
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# every mpirun here is on this node: without the libfabric BTL, whose close at MPI_Init
# sleeps 1 s per rank on a machine without a fabric (launch/mpirun.sh does the same)
export OMPI_MCA_btl="${OMPI_MCA_btl:-^ofi}"
if [[ $FAST == 1 ]]; then
  exec .venv/bin/python -m pytest -q -m "not slow and not mpi and not s3" "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
