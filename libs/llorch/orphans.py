"""Children that die with their parent (Linux ``PR_SET_PDEATHSIG``), even when it is SIGKILLed.

Every process a service starts (an engine, Redis under ``llorch up``, the GGUF reader's worker) asks
the kernel for a signal when its parent dies, so a killed service leaves no orphan holding a port,
memory or a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
from collections.abc import Callable
from typing import Final

_PR_SET_PDEATHSIG: Final = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: a preexec_fn only calls into it


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Ask for ``sig`` when the parent dies; exit now if ``parent`` (its pid) already died, since the
    request covers only a parent alive at the time it is made."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def preexec(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` (or a process pool's initializer: it pickles) for a child of the calling
    process."""
    return functools.partial(die_with_parent, os.getpid(), sig)
