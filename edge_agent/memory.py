"""Process-level memory settings for the agent on a small box (P7: steady RSS).

glibc gives every thread that allocates its own malloc arena (up to 8 x cores). The agent runs a
handful of threads (the default executor's inference threads, MQTT, outbox, telemetry, updates);
each arena keeps the pages it once used, so RSS creeps up by several MiB per thread under load.
``limit_malloc_arenas(1)`` makes all threads share the main heap: measured on the reference bundle
(``edgefed bench edge --sections p7``'s rig), 3,000 requests grew the agent by 11 MiB instead of
16 MiB, with no latency change beyond the noise of a loaded 2-core box.

This is a process-wide setting, so only the ``edgefed agent run`` entry point applies it, before the
agent's modules and threads start. A ``MALLOC_ARENA_MAX`` in the environment wins (glibc reads it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ["M_ARENA_MAX", "limit_malloc_arenas"]

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` (0: leave glibc's default); True if applied.

    Not glibc (musl, macOS) or an explicit ``MALLOC_ARENA_MAX``: nothing is changed, and it says so.
    """
    if arenas <= 0:
        return False
    if "MALLOC_ARENA_MAX" in os.environ:
        log.info("MALLOC_ARENA_MAX=%s is set in the environment; keeping it", os.environ["MALLOC_ARENA_MAX"])
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("no glibc mallopt here; malloc arenas are left as they are")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_ARENA_MAX, int(arenas)) != 1:
        log.warning("mallopt(M_ARENA_MAX, %d) was refused; malloc arenas are left as they are", arenas)
        return False
    return True
