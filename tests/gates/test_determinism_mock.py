"""The determinism harness (``gates.determinism``) checked on its own.

- End to end on the mock engine: ``examples/determinism-mock.yaml`` (two one-slot mock pools, one set),
  started by ``gates.stack`` exactly as the gate does it, with free ports and a temporary state dir; the
  harness must pass on 8 seeds, with every pair split over both replicas.
- On synthetic streams, no stack: the comparison finds the first differing token byte for byte, and a
  difference in ``tokens_out``, ``finish_reason`` or the terminal event; the diff writer records the first
  differing index and both streams; the report fails.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from gates import determinism
from gates.client import Frame, JsonObject, event_order_problems
from gates.determinism import Mismatch, Report, Run, SeedResult, Target, compare, run_from_frames
from tests.support.procs import free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "determinism-mock.yaml"


def _port_with_free_neighbour(offset: int) -> int:
    """A free port p with p + offset free too (metrics: scheduler on p, pool manager 0 on p + 10)."""
    for _ in range(200):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def _config_on_free_ports(tmp_path: Path, b_args: Sequence[str] = ()) -> Path:
    """The example on free ports with absolute paths; ``b_args`` are added to the second pool's engine."""
    config: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    config["pools"][1]["engine_args"] += list(b_args)
    config["state_dir"] = str(tmp_path / "state")
    config["grpc"] = {
        "scheduler": f"127.0.0.1:{free_port()}",
        "pool_manager_base_port": free_port(),
        "metrics_base_port": _port_with_free_neighbour(10),
    }
    for model in config["catalog"]["models"]:
        model["path"] = str((EXAMPLE.parent / model["path"]).resolve())
    path = tmp_path / "determinism-mock.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_harness_passes_on_two_mock_replicas(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--config", str(_config_on_free_ports(tmp_path)), "--bind", f"127.0.0.1:{free_port()}"]
    argv += [
        "--state-dir",
        str(tmp_path / "state"),
        "--seeds",
        "8",
        "--out",
        str(out),
        "--ready-timeout",
        "60",
    ]
    code = determinism.main(argv)
    summary_path = out / "determinism-summary.json"
    assert summary_path.is_file(), f"the harness could not run (exit {code}); see its stderr above"
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert code == 0, summary
    assert summary["passed"] is True and summary["seeds"] == 8 and summary["failed_seeds"] == []
    assert summary["pools"] == ["mock-det-a", "mock-det-b"]
    replicas = {row["name"]: row["n"] for row in summary["latency"] if row["scope"] == "replica"}
    assert replicas == {"mock-det-a-r0": 8, "mock-det-b-r0": 8}, "each pair must use both replicas"
    assert [row["name"] for row in summary["latency"] if row["scope"] == "device"] == ["cpu"]
    assert not list(out.glob("determinism-diff-*.json"))


def test_harness_fails_when_one_replica_diverges(tmp_path: Path) -> None:
    # The second pool's mock stops after 10 tokens: same set (engine args are not part of its key),
    # different streams. The harness must exit 1 and write one diff per seed.
    out = tmp_path / "out"
    config = _config_on_free_ports(tmp_path, ["--eos-after", "10"])
    argv = [
        "--config",
        str(config),
        "--bind",
        f"127.0.0.1:{free_port()}",
        "--state-dir",
        str(tmp_path / "state"),
    ]
    argv += ["--seeds", "2", "--out", str(out), "--ready-timeout", "60"]
    assert determinism.main(argv) == 1
    summary = json.loads((out / "determinism-summary.json").read_text(encoding="utf-8"))
    assert summary["passed"] is False and summary["failed_seeds"] == [1001, 1002]
    for seed in (1001, 1002):
        diff = json.loads((out / f"determinism-diff-{seed}.json").read_text(encoding="utf-8"))
        assert (diff["what"], diff["first_differing_index"]) == ("tokens", 10)
        lengths = sorted(len(diff[side]["tokens"]) for side in ("a", "b"))
        assert lengths == [10, 64]


# ---- synthetic streams ---------------------------------------------------------------------------


def frames_of(
    tokens: Sequence[str], replica: str = "p-a-r0", finish: str = "length", tokens_out: int | None = None
) -> list[Frame]:
    pool = replica.rsplit("-r", 1)[0]
    payloads: list[tuple[str, JsonObject]] = [
        ("started", {"task_id": "t", "queue_position": 0, "predicted_start_ms": 0}),
        (
            "metrics",
            {"phase": "dispatch", "pool_id": pool, "replica_id": replica, "engine": "mock", "seed": 1},
        ),
    ]
    for i, text in enumerate(tokens):
        payloads.append(("token", {"t": text, "i": i}))
        if i == 0:
            payloads.append(("metrics", {"phase": "decode", "tokens_out_so_far": 1}))
    end: JsonObject = {
        "tokens_out": len(tokens) if tokens_out is None else tokens_out,
        "finish_reason": finish,
        "first_token_ms": 5,
        "decode_ms": 50,
        "pool_id": pool,
        "replica_id": replica,
    }
    payloads.append(("end", end))
    return [Frame(seq, event, data, float(seq)) for seq, (event, data) in enumerate(payloads)]


def run_of(tokens: Sequence[str], replica: str, **end: Any) -> Run:
    return run_from_frames(f"task-{replica}", frames_of(tokens, replica, **end))


def test_identical_streams_match() -> None:
    a = run_of([" Once", " upon", " a"], "p-a-r0")
    b = run_of([" Once", " upon", " a"], "p-b-r0")
    assert (a.replica_id, b.replica_id, a.pool_id) == ("p-a-r0", "p-b-r0", "p-a")
    assert a.problems == () and compare(a, b) is None


def test_first_differing_token_is_found_byte_for_byte() -> None:
    a = run_of([" Once", " upon", " caf\u00e9", " time"], "p-a-r0")
    b = run_of([" Once", " upon", " cafe\u0301", " time"], "p-b-r0")  # same glyph, other bytes
    mismatch = compare(a, b)
    assert mismatch is not None and (mismatch.what, mismatch.index) == ("tokens", 2)


def test_a_shorter_stream_differs_where_it_ends() -> None:
    a = run_of([" Once", " upon"], "p-a-r0", finish="stop")
    b = run_of([" Once", " upon", " a"], "p-b-r0")
    mismatch = compare(a, b)
    assert mismatch is not None and (mismatch.what, mismatch.index) == ("tokens", 2)


def test_end_fields_and_terminals_are_compared() -> None:
    a = run_of([" x"], "p-a-r0", finish="stop")
    assert compare(a, run_of([" x"], "p-b-r0", finish="length")) == Mismatch(
        "finish_reason", None, "finish_reason 'stop' vs 'length'"
    )
    broken = run_of([" x"], "p-b-r0", tokens_out=2)
    mismatch = compare(a, broken)
    assert mismatch is not None and mismatch.what == "event_order"  # end.tokens_out ≠ tokens sent
    failed_frames = [*frames_of([" x"], "p-b-r0")[:-1]]
    failed_frames.append(Frame(len(failed_frames), "error", {"code": "WORKER_RESET", "tokens_out": 1}, 0.0))
    mismatch = compare(a, run_from_frames("t-err", failed_frames))
    assert mismatch is not None and mismatch.what == "terminal" and "WORKER_RESET" in mismatch.detail


def test_event_order_problems_are_reported() -> None:
    frames = frames_of([" a", " b"])
    swapped = [frames[0], frames[2], frames[1], *frames[3:]]  # a token before the dispatch metrics
    renumbered = [Frame(i, f.event, f.data, f.arrived_s) for i, f in enumerate(swapped)]
    assert event_order_problems(frames) == []
    assert any("dispatch" in p for p in event_order_problems(renumbered))


def test_a_mismatch_writes_the_diff_and_fails_the_report(tmp_path: Path) -> None:
    a = run_of([" Once", " upon", " a", " time"], "p-a-r0")
    b = run_of([" Once", " upon", " the", " time"], "p-b-r0")
    mismatch = compare(a, b)
    assert mismatch is not None
    path = determinism.write_diff(tmp_path, 1007, mismatch, a, b)
    assert path == tmp_path / "determinism-diff-1007.json"
    diff = json.loads(path.read_text(encoding="utf-8"))
    assert diff["seed"] == 1007 and diff["first_differing_index"] == 2 and diff["what"] == "tokens"
    assert diff["prompt"] == "Seed 1007: continue the story in one paragraph."
    assert diff["a"]["tokens"] == [" Once", " upon", " a", " time"]
    assert diff["b"]["tokens"] == [" Once", " upon", " the", " time"]
    assert (diff["a"]["replica_id"], diff["b"]["replica_id"]) == ("p-a-r0", "p-b-r0")

    target = Target("m", ("p-a", "p-b"), {"p-a": "cpu", "p-b": "cpu"})
    ok = SeedResult(1001, (a, a), 1)
    bad = SeedResult(1007, (a, b), 1, mismatch, str(path))
    report = Report(target, [ok, bad], 1.0)
    assert not report.passed
    summary = determinism.summary(report)
    assert summary["failed_seeds"] == [1007]
    assert "seed 1007: tokens" in determinism.format_report(report)


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert determinism.percentile(values, 50) == 50
    assert determinism.percentile(values, 95) == 95
    assert determinism.percentile([7], 95) == 7
    assert determinism.percentile([], 50) is None
