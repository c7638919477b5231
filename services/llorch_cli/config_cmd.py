"""``llorch config validate`` and ``llorch config schema`` (SPEC §7); the CLI main parses the arguments."""

from __future__ import annotations

import sys

from llorch.config import ConfigError, config_schema_json, load_config, resolve_config_path


def validate(path: str | None) -> int:
    """Check the config file (``path``, else ``$LLORCH_CONFIG``, else the default): 0 if valid, 2 if not."""
    try:
        load_config(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 2
    print(f"ok: {resolve_config_path(path)}")
    return 0


def schema() -> int:
    """Print the config's JSON Schema, exactly as committed in ``contracts/config.schema.json``."""
    sys.stdout.write(config_schema_json())
    return 0
