"""Release gates (SPEC §9) that talk to a running llama-orch stack over its public HTTP API only.

This package is a release tool, not part of the product: it imports nothing from ``llorch*`` (only the
standard library and aiohttp), so a gate cannot pass by reaching into the implementation.

- :mod:`gates.client`: a minimal public-API client (tasks, SSE frames, replica sets, pools, metrics).
- :mod:`gates.stack`: starts ``llorch up --config FILE`` as a child process and stops it again.
- :mod:`gates.determinism`: the determinism suite (``python -m gates.determinism --help``).

The Haiku gate is a pytest module, ``tests/gates/test_haiku.py``.
"""
