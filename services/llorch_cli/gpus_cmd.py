"""``llorch gpus``: print the GPU inventory the pool managers would see, as JSON."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from llorch.config import ConfigError, TelemetryConfig, load_config
from llorch.gpu import open_probe

DEFAULT_STATE_DIR = Path("~/.local/state/llorch")


def gpus(cfg_path: Path | None) -> int:
    """Print ``{kind, reason, devices}`` for the config's ``telemetry.gpu_provider`` (NVML without a
    config): 0 when printed (also when there are no GPUs: ``reason`` says why), 2 on an invalid config."""
    if cfg_path is None:
        telemetry, state_dir = TelemetryConfig(), DEFAULT_STATE_DIR.expanduser()
    else:
        try:
            cfg = load_config(cfg_path)
        except ConfigError as exc:
            for error in exc.errors:
                print(error, file=sys.stderr)
            return 2
        telemetry, state_dir = cfg.telemetry, cfg.state_dir
    probe = open_probe(telemetry, state_dir)
    try:
        inventory = {
            "kind": probe.kind,
            "reason": probe.reason,
            "devices": [asdict(dev) for dev in probe.devices()],
        }
    finally:
        probe.close()
    print(json.dumps(inventory, indent=2))
    return 0
