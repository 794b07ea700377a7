#!/usr/bin/env bash
# Fresh machine to a merged model: venv, install, tiny models, a real S3 server, mpirun -n 2.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./tools/setup_env.sh
exec .venv/bin/python launch/quickstart.py "$@"
