"""A free loopback TCP port, for the children a process starts on ports of its own choosing (engines,
the embedded Redis) and for tests.

The port is free when it is picked and released at once, so another process could take it before the
child binds it; the child then fails to start, as any start can, and its owner handles that as such."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
