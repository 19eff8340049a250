# Sourced by scripts/quickstart.sh and scripts/test.sh: make the project's virtual environment.
#
#   denuc_venv EXTRAS     creates .venv (or $DENUC_VENV) when missing, installs the package
#                         editable with EXTRAS into it, and sets PY to its python.
#
# Why a venv: Debian 12 and Ubuntu 23.04+ refuse `pip install` into the system python
# (PEP 668, "externally-managed-environment"), and ship `python3` but no `python`.
# The base interpreter is $PYTHON if set, else python3, else python. As root, a missing
# python3-venv (Debian splits venv/ensurepip out of python3) is installed with apt. With uv on
# PATH (and DENUC_NO_UV unset) uv makes the venv and installs, which is faster.
# The install is skipped when pyproject.toml and the extras are unchanged since the last one
# (then only the package itself is re-linked if the environment served another checkout).

# apt-get as root; dpkg needs the sbin folders on PATH, which a PATH=/usr/bin:/bin login lacks.
denuc_apt() { PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" DEBIAN_FRONTEND=noninteractive apt-get "$@"; }

denuc_base_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for c in python3 python; do
    if command -v "$c" >/dev/null 2>&1; then echo "$c"; return; fi
  done
  echo "error: no python3 found; install it (Debian/Ubuntu: apt install python3 python3-venv)" >&2
  return 1
}

denuc_use_uv() { [ -z "${DENUC_NO_UV:-}" ] && command -v uv >/dev/null 2>&1; }

denuc_ensure_venv_module() {
  local base="$1"
  if "$base" -c "import venv, ensurepip" >/dev/null 2>&1; then return 0; fi
  local ver pkgs
  ver=$("$base" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  pkgs="python3-venv python${ver}-venv"
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing $pkgs (python's venv module) with apt" >&2
    denuc_apt update -qq
    # python3.X-venv may not exist under that name on every release: try both, then python3-venv alone
    denuc_apt install -y -qq --no-install-recommends $pkgs || denuc_apt install -y -qq --no-install-recommends python3-venv
  else
    echo "error: $base cannot create virtual environments; install python's venv module (sudo apt install $pkgs) and run again" >&2
    return 1
  fi
}

denuc_venv() {
  local extras="$1" venv="${DENUC_VENV:-.venv}" base
  base=$(denuc_base_python) || return 1
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating the virtual environment $venv (from $(command -v "$base" || echo "$base"))" >&2
    if denuc_use_uv; then
      uv venv -q --python "$(command -v "$base")" "$venv"
    else
      denuc_ensure_venv_module "$base" || return 1
      "$base" -m venv "$venv"
    fi
  fi
  PY="$venv/bin/python"
  local stamp="$venv/.napari-denuc-installed" want
  want="$(cksum < pyproject.toml) [$extras]"
  if [ -f "$stamp" ] && grep -qxF "$want" "$stamp"; then
    # same dependencies: only make sure the editable install points at this checkout
    if [ "$("$PY" -c 'import napari_denuc, os; print(os.path.dirname(os.path.dirname(os.path.abspath(napari_denuc.__file__))))' 2>/dev/null)" != "$(pwd)/src" ]; then
      if denuc_use_uv; then uv pip install -q --python "$PY" --no-deps -e .; else "$PY" -m pip install -q --no-deps -e .; fi
    fi
    return 0
  fi
  echo "installing napari-denuc[$extras] into $venv (the first time takes a few minutes: torch, napari)" >&2
  if denuc_use_uv; then
    uv pip install -q --python "$PY" -e ".[$extras]"
  else
    "$PY" -m pip install -q -e ".[$extras]"
  fi
  # one line per extras set installed for this pyproject.toml (quickstart and test.sh differ)
  if [ -f "$stamp" ] && grep -q "^$(cksum < pyproject.toml) \[" "$stamp"; then
    echo "$want" >> "$stamp"
  else
    echo "$want" > "$stamp"
  fi
}
