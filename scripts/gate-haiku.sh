#!/usr/bin/env bash
# The Haiku gate (SPEC §9): start the stack from GATE_CONFIG with `llorch up` (gates.stack, fresh state
# dir), run tests/gates/test_haiku.py against it over the public API, stop the stack, exit with pytest's
# status (2 when the stack did not come up). `make haiku` runs it with LLORCH_ALLOW_CPU_GATE=1.
#
#   GATE_CONFIG   config to start (default examples/dev-llamacpp.yaml)
#   GATE_BIND     gateway host:port for the run (default 127.0.0.1:8080; must be free)
#   LLORCH_GATE_OUT  where a copy of the text goes (default gate-out/); the gate stores it as a
#                    trace artifact through POST /v1/artifacts and reads it back
#   LLORCH_ALLOW_CPU_GATE=1  lets a CPU-only set count (reported as cpu-fallback)
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$self")/.."
PY="${PY:-.venv/bin/python}"

if [ "${1:-}" = "--in-stack" ]; then
  # Called back by gates.stack once /readyz is 200, with LLORCH_BASE_URL and LLORCH_GATE_STATE_DIR set.
  # The token: the caller's LLORCH_API_TOKEN (the stack was given it), else the file llorch up wrote.
  if [ -z "${LLORCH_API_TOKEN:-}" ]; then
    LLORCH_API_TOKEN="$(cat "$LLORCH_GATE_STATE_DIR/api.token")"
    export LLORCH_API_TOKEN
  fi
  exec env REQUIRE_REAL_LLAMA=1 "$PY" -m pytest -q -s -rA -p no:cacheprovider tests/gates/test_haiku.py
fi

config="${GATE_CONFIG:-examples/dev-llamacpp.yaml}"
export LLORCH_GATE_OUT="${LLORCH_GATE_OUT:-gate-out}"
if ! command -v llama-server >/dev/null && [ -f .stamps/llama-server-path ]; then
  PATH="$(dirname "$(cat .stamps/llama-server-path)"):$PATH"  # the one `make engine` built
fi
state="$(mktemp -d "${TMPDIR:-/tmp}/llorch-haiku.XXXXXX")"
trap 'rm -rf "$state"' EXIT
mkdir -p "$LLORCH_GATE_OUT"
start=$SECONDS
status=0
"$PY" -m gates.stack --config "$config" --bind "${GATE_BIND:-127.0.0.1:8080}" --state-dir "$state" \
  --log "$LLORCH_GATE_OUT/haiku-llorch-up.log" -- "$self" --in-stack || status=$?
echo "haiku gate: exit $status after $((SECONDS - start)) s (stack log: $LLORCH_GATE_OUT/haiku-llorch-up.log)"
exit "$status"
