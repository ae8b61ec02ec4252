#!/usr/bin/env bash
# Builds a CPU venv for every ComfyUI snapshot in ../shared/comfyui (0.3.64, 0.8.0, 0.33.0, ...) so the
# integration tests run the pack inside each of them. Reuses what an earlier run built (seconds then).
#
#   DISTORCH_COMFYUI_HOME   where the trees and venvs go (default ~/.cache/distorch/comfyui; tests read it too)
#   DISTORCH_SHARED         the folder holding comfyui/ and reference/ (default: ../shared beside the repo)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SHARED="${DISTORCH_SHARED:-$REPO/../shared}"
[ -d "$SHARED/comfyui" ] || SHARED=/work/shared
SNAPSHOTS="$SHARED/comfyui"
HOME_DIR="${DISTORCH_COMFYUI_HOME:-$HOME/.cache/distorch/comfyui}"
if [ ! -f "$SNAPSHOTS/setup.sh" ]; then
  echo "setup_comfyui: no ComfyUI snapshots in $SNAPSHOTS; the integration tests will be skipped" >&2
  [ "${CI:-}" = "true" ] && exit 1
  exit 0
fi
mkdir -p "$HOME_DIR"
for tarball in "$SNAPSHOTS"/comfyui-*.tar.gz; do
  version="$(basename "$tarball" .tar.gz)"; version="${version#comfyui-}"
  echo "setup_comfyui: ComfyUI $version"
  # The pack's requirements go into each venv (ComfyUI imports the pack with its own interpreter); a stamp
  # of them skips that pip run when nothing changed.
  stamp="$HOME_DIR/pack-requirements-$version.sha256"
  wanted="$(cat "$REPO/requirements.txt" "$REPO/requirements-test.txt" | sha256sum | cut -d' ' -f1)"
  extra="$REPO/requirements.txt $REPO/requirements-test.txt"
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && extra=""
  EXTRA_REQUIREMENTS="$extra" bash "$SNAPSHOTS/setup.sh" "$version" "$HOME_DIR" > "$HOME_DIR/setup-$version.log" 2>&1 \
    || { tail -30 "$HOME_DIR/setup-$version.log" >&2; exit 1; }
  echo "$wanted" > "$stamp"
done
