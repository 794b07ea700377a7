#!/usr/bin/env bash
# Fresh machine to a merged model: venv, install, tiny models, a real S3 server, mpirun -n 2.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIGMERGE_WARM=background BIGMERGE_WARM_FIRST=model_stock ./tools/setup_env.sh  # the kernels compile while the zoo trains
exec .venv/bin/python launch/quickstart.py "$@"
