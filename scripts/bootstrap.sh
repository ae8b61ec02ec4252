#!/usr/bin/env bash
# Creates .venv with everything the demo, the tests and the benchmarks need.
# torch is installed first and pinned, so nothing later can pull a CUDA build from the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -r requirements.txt -r requirements-test.txt
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
