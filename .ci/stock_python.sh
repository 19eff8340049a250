#!/usr/bin/env bash
# CI step: the README's quick start and test command on the distribution's own python3, in a
# fresh clone, with PATH limited to /usr/bin:/bin (no pyenv/conda `python`, PEP 668 in force).
#   bash .ci/stock_python.sh            # clones HEAD of this repository into a temporary folder
# Proves: scripts/quickstart.sh exits 0 and writes the GeoJSON; scripts/test.sh runs (on the
# I/O tests: the whole suite already ran in .ci/run).
# Cost: installing torch + napari into a new environment takes about 6 minutes here, and pip's
# cache does not help (the wheels come from local indexes). So the environment is kept in
# ~/.cache/napari-denuc/ per pyproject.toml checksum: every change of the dependencies gets a
# brand-new environment made by the scripts from /usr/bin/python3; otherwise the scripts reuse
# it and only re-link the package. DENUC_CI_FRESH=1 forces a new one.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
cd "$work/clone"
cache="$HOME/.cache/napari-denuc"
key="$(cksum < pyproject.toml | cut -d' ' -f1)"
venv="$cache/ci-stock-venv-$key"
mkdir -p "$cache"
for old in "$cache"/ci-stock-venv-*; do  # environments of older dependency sets
  if [ -e "$old" ] && [ "$old" != "$venv" ]; then rm -rf "$old"; fi
done
if [ -n "${DENUC_CI_FRESH:-}" ]; then rm -rf "$venv"; fi
[ -d "$venv" ] && echo "reusing $venv (same pyproject.toml)" >&2 || echo "new environment $venv" >&2
stock() {
  # a clean environment: only what a fresh login on Debian would have, plus pip's own settings
  env -i HOME="$HOME" PATH=/usr/bin:/bin LANG=C.UTF-8 CI=1 DENUC_VENV="$venv" \
    ${PIP_FIND_LINKS:+PIP_FIND_LINKS="$PIP_FIND_LINKS"} ${PIP_INDEX_URL:+PIP_INDEX_URL="$PIP_INDEX_URL"} \
    ${PIP_EXTRA_INDEX_URL:+PIP_EXTRA_INDEX_URL="$PIP_EXTRA_INDEX_URL"} ${PIP_CERT:+PIP_CERT="$PIP_CERT"} \
    "$@"
}
if stock bash -c 'command -v python' >/dev/null 2>&1; then
  echo "note: this machine has a 'python' in /usr/bin:/bin; the stock path is still python3" >&2
fi
t0=$(date +%s)
stock bash scripts/quickstart.sh out
t1=$(date +%s)
geojson=$(ls out/*.geojson)
stock "$venv/bin/python" - "$geojson" <<'PY'
import sys
from napari_denuc.io.points import read_points
det = read_points(sys.argv[1])
assert len(det) > 100, f"only {len(det)} nuclei in {sys.argv[1]}"
print(f"stock quick start: {len(det)} nuclei in {sys.argv[1]}")
PY
stock bash scripts/test.sh -q -p no:cacheprovider tests/test_io.py
t2=$(date +%s)
echo "stock python CI step: quick start $((t1 - t0)) s, test command $((t2 - t1)) s"
