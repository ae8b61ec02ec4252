#!/usr/bin/env bash
# Creates .venv with everything the demo, the tests and the benchmarks need.
# torch is installed first and pinned, so nothing later can pull a CUDA build from the registry.
#
#   bash scripts/bootstrap.sh          # .venv: enough for the demo, the CLI and the unit tests
#   bash scripts/bootstrap.sh --test   # also the real ComfyUI installs the integration tests run in, and
#                                      # Debian's Chromium for the browser tests (apt-get, as root)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c scripts/constraints.txt \
  -r requirements.txt -r requirements-test.txt
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# The browser tests drive Debian's Chromium with playwright (whose own browser download cannot work offline).
install_chromium() {
  [ -x /usr/bin/chromium ] && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && return 0
  fi
  echo "bootstrap: could not install Chromium (apt-get install chromium); the browser tests will be skipped" >&2
  [ "${CI:-}" != "true" ]  # under CI that is a failure: the browser tests must run there
}
if [ "${1:-}" = "--test" ]; then
  bash scripts/setup_comfyui.sh
  install_chromium
fi
