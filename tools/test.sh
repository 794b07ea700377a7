#!/usr/bin/env bash
# Set up (or reuse) .venv and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./tools/setup_env.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# every mpirun here is on this node: without the libfabric BTL, whose close at MPI_Init
# sleeps 1 s per rank on a machine without a fabric (launch/mpirun.sh does the same)
export OMPI_MCA_btl="${OMPI_MCA_btl:-^ofi}"
exec .venv/bin/python -m pytest -q "$@"
