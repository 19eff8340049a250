#!/usr/bin/env bash
# Install what the tests need and run them under a virtual display.
#   bash scripts/test.sh [pytest args...]     (DENUC_TEST_WORKERS=N: N pytest-xdist workers, default 2)
# As root on Debian/Ubuntu, missing system libraries for Qt/OpenGL under Xvfb are installed
# with apt (apt-get update runs only when something is missing). Then the package is installed
# editable with all extras into the project's virtual environment .venv (scripts/_venv.sh),
# `ruff check` lints the code, and pytest runs under xvfb-run (or an Xvfb we start ourselves).
# DENUC_SKIP_LINT=1 skips the lint step.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh

APT_PACKAGES=(xvfb xauth libgl1 libegl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0
  libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0
  libxcb-cursor0 libdbus-1-3 libfontconfig1)

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "scripts/test.sh: installing ${missing[*]}" >&2
    denuc_apt update -qq
    denuc_apt install -y -qq --no-install-recommends "${missing[@]}"
  fi
elif [ "$(id -u)" != "0" ]; then
  echo "scripts/test.sh: not root, skipping apt (napari tests need xvfb and the Qt/OpenGL libraries)" >&2
fi

denuc_venv "all"
PYTHON="$PY"
if [ -z "${DENUC_SKIP_LINT:-}" ]; then
  "$PYTHON" -m ruff check .   # configured in pyproject.toml; fails the run on lint errors
fi

# Two workers (pytest-xdist): most napari tests wait on Qt timers and threads, not the CPU, so two
# run side by side on 2 cores in about 70 % of the serial time. DENUC_TEST_WORKERS=0: one process.
set -- -n "${DENUC_TEST_WORKERS:-2}" "$@"

export QT_QPA_PLATFORM="${QT_QPA_PLATFORM:-xcb}"
export NAPARI_DENUC_REQUIRE_DISPLAY=1   # napari tests must run here, not skip
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

if [ -n "${DISPLAY:-}" ]; then
  exec "$PYTHON" -m pytest -q "$@"
elif command -v xvfb-run >/dev/null 2>&1; then
  exec xvfb-run -a -s "-screen 0 1280x1024x24" "$PYTHON" -m pytest -q "$@"
elif command -v Xvfb >/dev/null 2>&1; then
  disp=":$((90 + RANDOM % 100))"
  Xvfb "$disp" -screen 0 1280x1024x24 -nolisten tcp >/dev/null 2>&1 &
  xvfb_pid=$!
  trap 'kill "$xvfb_pid" 2>/dev/null || true' EXIT
  sleep 1
  DISPLAY="$disp" "$PYTHON" -m pytest -q "$@"
else
  echo "scripts/test.sh: no Xvfb found; napari tests will fail (install xvfb)" >&2
  exec "$PYTHON" -m pytest -q "$@"
fi
