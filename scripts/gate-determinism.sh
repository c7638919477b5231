#!/usr/bin/env bash
# The determinism gate (SPEC §9): start the stack from GATE_CONFIG with `llorch up` (gates.stack), run the
# seeds of tests/determinism/seeds.txt on its two replicas, stop the stack, exit with the suite's status
# (0 pass, 1 mismatch, 2 could not run). `make determinism` runs it.
#
#   GATE_CONFIG   config to start (default examples/determinism-cpu.yaml: two llama-server replicas on CPU)
#   GATE_BIND     gateway host:port for the run (default 127.0.0.1:8080; must be free)
#   LLORCH_GATE_OUT  where the summary, diffs and the stack's log go (default gate-out/)
# Extra arguments go to `python -m gates.determinism` (e.g. --seeds 8).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
config="${GATE_CONFIG:-examples/determinism-cpu.yaml}"
out="${LLORCH_GATE_OUT:-gate-out}"
if ! command -v llama-server >/dev/null && [ -f .stamps/llama-server-path ]; then
  PATH="$(dirname "$(cat .stamps/llama-server-path)"):$PATH"  # the one `make engine` built
fi
start=$SECONDS
status=0
"$PY" -m gates.determinism --config "$config" --bind "${GATE_BIND:-127.0.0.1:8080}" --out "$out" "$@" || status=$?
echo "determinism gate: exit $status after $((SECONDS - start)) s (summary: $out/determinism-summary.json)"
exit "$status"
