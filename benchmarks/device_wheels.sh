#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with wheels of the packages the GPU machine lacks, for Python 3.12 x86-64,
# at the versions poetry.lock and requirements-nodeps.txt pin, so the benchmarks run there (it has torch but no registry).
# On that machine: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(fish-speech descript-audio-codec descript-audiotools hydra-core omegaconf antlr4-python3-runtime argbind
  docstring-parser flatten-dict ffmpy julius importlib-resources librosa lazy-loader audioread loguru loralib
  randomname fire termcolor soundfile soxr pyloudnorm pystoi torch-stoi markdown2 tensorboard tensorboard-data-server
  absl-py markdown werkzeug protobuf einops click tqdm cffi pycparser openai-whisper more-itertools tokenizers safetensors)
locked() {
  awk -v n="$1" '$0=="name = \""n"\"" {getline; gsub(/version = |"/,""); print; exit}' poetry.lock
  sed -n "s/^$1==\([^ ]*\) .*/\1/p" requirements-nodeps.txt
}
rm -rf .whl && mkdir -p .whl
for pkg in "${PACKAGES[@]}"; do
  version=$(locked "$pkg"); [ -n "$version" ] || { echo "not in poetry.lock: $pkg" >&2; exit 1; }
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$pkg==$version" 2>/dev/null; then
    python3 -m pip wheel -q --no-deps -w .whl "$pkg==$version"  # source-only, pure Python
  fi
done
du -sh .whl
