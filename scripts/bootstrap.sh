#!/usr/bin/env bash
# Installs everything fs-pipeline needs, then runs one task in the project's environment:
#   bash scripts/bootstrap.sh demo    # the whole job on the built-in sample with a generated tiny model
#   bash scripts/bootstrap.sh test    # the test suite (CI runs exactly this)
#   bash scripts/bootstrap.sh         # install only
# Idempotent: a second run skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

POETRY_VERSION=2.5.1
FIRST_INSTALL_GB=6  # .venv measured at 5.3-5.6 GB, most of it torch's CUDA build
APT_PACKAGES=(ffmpeg espeak-ng sox chromium)  # chromium: the browser tests/test_webui.py drives
POETRY_HOME_DIR="${XDG_DATA_HOME:-$HOME/.local/share}/fs-pipeline/poetry"

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

install_system_packages() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return
  if ! command -v apt-get >/dev/null; then
    say "install these system packages with your package manager, then rerun: ${missing[*]}"
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    say "system packages missing; run this, then rerun: sudo apt-get update && sudo apt-get install -y ${missing[*]}"
    exit 1
  fi
  say "installing system packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Poetry lives in its own venv, next to the plugin that lets it install from the simple index
# (Poetry's default source needs a JSON API that not every registry serves).
ensure_poetry() {
  if [ ! -x "$POETRY_HOME_DIR/bin/poetry" ] || ! "$POETRY_HOME_DIR/bin/poetry" --version 2>/dev/null | grep -q "$POETRY_VERSION"; then
    say "installing Poetry $POETRY_VERSION into $POETRY_HOME_DIR"
    python3 -m venv "$POETRY_HOME_DIR"
    "$POETRY_HOME_DIR/bin/python" -m pip install -q --disable-pip-version-check "poetry==$POETRY_VERSION" "poetry-plugin-pypi-mirror==0.6.5"
  fi
  if ! command -v poetry >/dev/null; then
    mkdir -p "$HOME/.local/bin"
    ln -sf "$POETRY_HOME_DIR/bin/poetry" "$HOME/.local/bin/poetry"
    say "linked poetry into ~/.local/bin; add it to PATH to type 'poetry run ...' yourself"
  fi
  POETRY="$POETRY_HOME_DIR/bin/poetry"
  # The registry pip itself uses, read at run time, so that no host name is written in the repo.
  : "${POETRY_PYPI_MIRROR_URL:=$(python3 -c 'from pip._internal.models.index import PyPI; print(PyPI.simple_url)')}"
  export POETRY_PYPI_MIRROR_URL
}

# A full disk makes the install fail partway with little to show for it, so check first.
check_disk_space() {
  [ -d .venv ] && return
  local free_gb
  free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1024 / 1024)}')
  if [ "$free_gb" -lt "$FIRST_INSTALL_GB" ]; then
    say "only $free_gb GB free on the disk of $(pwd); the first install needs about $FIRST_INSTALL_GB GB for .venv: free some space, then rerun"
    exit 1
  fi
}

install_python_packages() {
  say "installing Python packages (poetry install; first run downloads torch, about 3 GB)"
  # Where Python may not write bytecode itself (PYTHONDONTWRITEBYTECODE, as on our machines), --compile writes it at
  # install: without it every process compiles torch's sources again (seconds each). Elsewhere Python writes it on
  # first import, for only what is imported, and the install is spared a minute or two of compiling. It compiles
  # what this run installs; a .venv made before keeps what it has (delete it to rebuild it compiled).
  local compile=()
  [ -n "${PYTHONDONTWRITEBYTECODE:-}" ] && compile=(--compile)
  "$POETRY" install --no-interaction "${compile[@]}"  # not --quiet: it hides the error too
  # fish-speech and the descript codec packages declare deps that can't be installed cleanly
  # (pyaudio, gradio, protobuf<3.20, ...); pyproject.toml lists what their code really imports.
  "$POETRY" run python -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements-nodeps.txt
}

install_system_packages
check_disk_space
ensure_poetry
install_python_packages

case "${1:-}" in
  "") say "installed; try: bash scripts/bootstrap.sh demo" ;;
  demo) shift; exec "$POETRY" run python -m fs_pipeline.demo "$@" ;;
  test) shift; exec "$POETRY" run pytest "$@" ;;
  *) say "unknown task '$1': use demo, test, or nothing to only install"; exit 2 ;;
esac
