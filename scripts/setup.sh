#!/usr/bin/env bash
# Installs everything densenet-pipe needs on a fresh Debian machine into ./.venv.
# Idempotent: a stamp keyed on the dependency files makes a re-run return in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=${PYTHON:-python3}
STAMP=$VENV/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/densenet-pipe" ]; then
  exit 0
fi

# System packages FFCV's C++ extension builds against (OpenCV core+imgproc, libturbojpeg)
# and the shared libraries OpenCV loads at import. libopencv-dev would also do, at ~190 MB.
APT_PKGS="g++ pkg-config libopencv-core-dev libopencv-imgproc-dev libturbojpeg0-dev libgl1 libglib2.0-0"
missing=""
for p in $APT_PKGS; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing system packages:$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# Debian ships opencv4.pc only in libopencv-dev, whose umbrella header includes every module.
# FFCV needs core+imgproc alone, so a two-file shim stands in for it at build time.
SHIM=$ROOT/.build/opencv-shim
mkdir -p "$SHIM/include/opencv2" "$SHIM/pkgconfig"
cat > "$SHIM/include/opencv2/opencv.hpp" <<'HPP'
#pragma once
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
HPP
cat > "$SHIM/pkgconfig/opencv4.pc" <<PC
Name: OpenCV
Description: core and imgproc, for building ffcv
Version: 4
Libs: -lopencv_core -lopencv_imgproc
Cflags: -I$SHIM/include -I/usr/include/opencv4
PC
export PKG_CONFIG_PATH=$SHIM/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# The machine's pip config lists local indexes that may be absent; their warnings are noise.
pip_install() {
  local rc
  set +e
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither"
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}
# torch first: ffcv's dependency pytorch_pfn_extras would otherwise pull an arbitrary torch.
pip_install "torch==2.14.1" "torchvision==0.29.1"
pip_install -e ".[dev]"
echo "$want" > "$STAMP"
echo "setup: done ($VENV)"
