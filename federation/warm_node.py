"""A Flower SuperNode whose ClientApps start warm: ``python -m federation.warm_node [--poll-s S] -- ARGS``.

Flower 1.41's SuperNode runs each message in a new ``flwr-clientapp`` process (Python, Flower's
imports, then the app: 2.5-3 s of CPU each, paid by every region at once in every round), asks its
SuperLink for messages every 3 s and looks for a finished reply every 0.5 s; neither interval is an
option. Together these were nearly all of a federated round's orchestration overhead (README, P6).
This wrapper keeps Flower's own processes and code paths and changes only how fast they start:

- ``flower-supernode ARGS`` runs in this process with ``--isolation process``: the SuperNode serves
  its Runtime API and leaves starting ClientApps to a SuperExec of ours (Flower's documented mode for
  an externally managed executor);
- that SuperExec (``python -m federation.warm_node superexec``) is Flower's own ``run_superexec``
  loop with ``ForkExecutor`` as its executor: each ClientApp is forked from a ``multiprocessing``
  fork server that imported Flower's ClientApp runtime and this project's ClientApp once, and the
  child runs Flower's own ``run_clientapp`` (what ``flwr-clientapp`` runs) with the task's token;
- instead of asking the SuperNode for a task every 0.2 s (a quarter of a 2-core machine for ten idle
  SuperNodes, measured), that SuperExec sleeps until the SuperNode writes a byte on a pipe once it
  has stored a message and created its task (``notify_tasks``/``TaskWake``; 2 s at most);
- the SuperNode's poll of its SuperLink between empty pulls (Flower: 3 s) waits ``--poll-s``
  (default 0.2 s), and its local check for a ClientApp's reply (Flower: 0.5 s) 0.02 s
  (``CappedSleep``);
- a ClientApp that finds its message's objects not yet on the SuperNode retries after 0.05 s
  instead of Flower's 1 s (``PULL_BACKOFF_S``).

The seams are module attributes of the pinned Flower (``flwr==1.41.0``);
``tests/unit/test_warm_node.py`` fails if they move. ``edgefed fed supernode --no-warm`` runs plain
``flower-supernode`` instead. Everything stays in the SuperNode's process group, so stopping the
group stops the SuperExec, the fork server and any running ClientApp.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import select
import subprocess
import sys
import time
import types
from collections.abc import Sequence
from typing import Any

__all__ = ["ForkExecutor", "CappedSleep", "DEFAULT_POLL_S", "PRELOAD", "main", "warm_supernode_argv"]

DEFAULT_POLL_S = 0.2
"""The SuperNode's poll of its SuperLink for messages (Flower's own: 3 s)."""

REPLY_WAIT_S = 0.02
"""The SuperNode's local check for a ClientApp's reply (Flower's own: 0.5 s)."""

PRELOAD = ("flwr.supernode.runtime.run_clientapp", "federation.client_app", "federation.trainer", "httpx",
           "httpcore", "h11", "encodings.cp437")
"""Imported once by the fork server, so that each ClientApp starts with them loaded."""


class CappedSleep(types.ModuleType):
    """Stands in for the ``time`` module inside Flower's SuperNode loop: its poll between empty pulls
    from the SuperLink (``sleep(3)``) waits ``cap`` seconds, its local waits for a ClientApp's reply
    (``sleep(0.5)``, an in-memory check) ``short_cap``; everything else is ``time``'s own."""

    def __init__(self, cap: float, short_cap: float = REPLY_WAIT_S) -> None:
        super().__init__("time")
        if not 0.0 < cap <= 3.0:
            raise ValueError(f"poll interval {cap} s is outside (0, 3]")
        self.cap, self.short_cap = cap, short_cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap if seconds >= 1.0 else self.short_cap))

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - time.time, time.monotonic, ...
        return getattr(time, name)


class TaskWake(types.ModuleType):
    """Stands in for the ``time`` module inside Flower's SuperExec loop: instead of polling the
    SuperNode for a task every few tenths of a second, ``sleep`` waits until the SuperNode writes a
    byte for a new task on ``fd`` (one byte per task, so none is missed), or ``max_idle_s``."""

    def __init__(self, fd: int, max_idle_s: float = 2.0) -> None:
        super().__init__("time")
        self.fd, self.max_idle_s, self._parent_gone = fd, max_idle_s, False

    def sleep(self, seconds: float) -> None:
        if self._parent_gone:
            time.sleep(seconds)
            return
        ready, _, _ = select.select([self.fd], [], [], self.max_idle_s)
        if ready and not os.read(self.fd, 1):  # end of file: the SuperNode is gone (its monitor ends us)
            self._parent_gone = True

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        return getattr(time, name)


def cap_supernode_polls(poll_s: float) -> None:
    """Cap the sleeps of Flower's SuperNode loop (``flwr.supernode.start_client_internal``)."""
    import flwr.supernode.start_client_internal as loop

    if getattr(loop, "time", None) is not time and not isinstance(getattr(loop, "time", None), CappedSleep):
        raise RuntimeError("flwr.supernode.start_client_internal no longer uses the time module; "
                           "this Flower version is not supported by federation.warm_node (use --no-warm)")
    loop.time = CappedSleep(poll_s)  # type: ignore[attr-defined]


def notify_tasks(fd: int) -> None:
    """After the SuperNode loop has stored a message (and created its task), write a byte to ``fd``."""
    import flwr.supernode.start_client_internal as loop

    current = loop._pull_and_store_message  # noqa: SLF001 - the seam (tests/unit/test_warm_node.py)
    original = getattr(current, "__wrapped__", current)

    @functools.wraps(original)
    def pull_and_notify(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        run_id = original(*args, **kwargs)
        if run_id is not None:
            try:
                os.write(fd, b"t")
            except BlockingIOError:  # the pipe is full of wake-ups already
                pass
        return run_id

    loop._pull_and_store_message = pull_and_notify  # noqa: SLF001


PULL_BACKOFF_S = (0.05, 1.0)
"""A ClientApp's first retry and cap when the message it pulls is not all on its SuperNode yet
(Flower's: 1 s doubling to 10 s, sized for ClientApps that take seconds to start)."""


def shorten_pull_backoff(initial_s: float = PULL_BACKOFF_S[0], cap_s: float = PULL_BACKOFF_S[1]) -> None:
    """Flower's SuperNode creates the task and stores the message before it has pulled the message's
    objects from the SuperLink; a ClientApp that starts at once finds them missing and backs off,
    1 s first. Here the ClientApp runtime retries after ``initial_s`` instead."""
    import flwr.supernode.runtime.run_clientapp as runtime

    current = runtime.pull_and_inflate_object_from_tree
    original = getattr(current, "func", current)  # not twice
    runtime.pull_and_inflate_object_from_tree = functools.partial(  # type: ignore[assignment]
        original, initial_backoff=initial_s, backoff_cap=cap_s)


def _run_clientapp(spec: Any) -> None:  # noqa: ANN401 - flwr's ExecutionSpec
    """In a forked child: what ``flwr-clientapp --token ...`` runs, with the task's own settings."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    shorten_pull_backoff()
    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )


def _ready() -> None:
    """The first child: starts the fork server (and its imports) before the first message arrives."""


class ForkExecutor:
    """Flower's executor interface (``flwr.supercore.superexec.executor.types.Executor``) for
    ClientApp tasks, forking each from a warm fork server; other task types go to Flower's
    ``SubprocessExecutor``."""

    def __init__(self, preload: Sequence[str] = PRELOAD) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(preload))
        self._fallback = SubprocessExecutor()
        self._children: list[multiprocessing.process.BaseProcess] = []
        started = time.monotonic()
        first = self._ctx.Process(target=_ready, name="warm-clientapp-ready")
        first.start()
        first.join()
        self.warmup_s = time.monotonic() - started

    def get_eligible_capacity(self, supported_task_types: set[Any], *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set[Any], set[str]]:
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: Any = None, *, fab_hash: str | None = None,  # noqa: ANN401
                          insecure: bool = False, root_certificates_path: str | None = None) -> None:
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec: Any) -> Any:  # noqa: ANN401 - ExecutionSpec -> LaunchResult
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        child = self._ctx.Process(target=_run_clientapp, args=(spec,), name=f"clientapp-task-{spec.task_id}")
        try:
            child.start()
        except OSError as exc:  # the fork server is gone: Flower records the task as failed to launch
            return LaunchResult.failed(f"could not fork a warm ClientApp: {exc}")
        self._children.append(child)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished ClientApps (``is_alive`` collects their exit status)."""
        self._children = [c for c in self._children if c.is_alive()]

    def close(self) -> None:
        """Running ClientApps finish on their own (they watch their parent, as Flower's do)."""


def _superexec(argv: Sequence[str]) -> None:
    """Flower's SuperExec loop with ``ForkExecutor`` (``get_executor`` is the seam)."""
    parser = argparse.ArgumentParser(prog="python -m federation.warm_node superexec")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--wake-fd", type=int, required=True)
    args = parser.parse_args(argv)
    import flwr.supercore.superexec.run_superexec as superexec

    if not callable(getattr(superexec, "get_executor", None)) or superexec.time is not time:
        raise RuntimeError("flwr.supercore.superexec.run_superexec.get_executor is gone; this Flower "
                           "version is not supported by federation.warm_node (use --no-warm)")
    executor = ForkExecutor()
    print(f"warm ClientApp fork server ready in {executor.warmup_s:.2f} s (preloaded {', '.join(PRELOAD)})",
          flush=True)
    superexec.get_executor = lambda *_a, **_k: executor  # type: ignore[assignment]
    superexec.time = TaskWake(args.wake_fd)  # type: ignore[attr-defined]
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=True, parent_pid=args.parent_pid)


def _supernode(poll_s: float, flower_args: list[str]) -> None:
    known = argparse.ArgumentParser(add_help=False)
    known.add_argument("--host", default="127.0.0.1")
    known.add_argument("--port", type=int, default=9094)
    known.add_argument("--isolation")
    known.add_argument("--ssl-certfile")
    ns, _ = known.parse_known_args(flower_args)
    if ns.ssl_certfile is not None:
        raise SystemExit("federation.warm_node: a TLS Runtime API (--ssl-certfile) is not supported; "
                         "the Runtime API stays on loopback, or use --no-warm")
    if ns.isolation not in (None, "process"):
        raise SystemExit(f"federation.warm_node runs --isolation process, not {ns.isolation!r}")
    cap_supernode_polls(poll_s)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    notify_tasks(wake_w)
    superexec = subprocess.Popen(  # same process group: stopping the SuperNode's group stops it too
        [sys.executable, "-m", "federation.warm_node", "superexec", "--runtime-api-address", f"{ns.host}:{ns.port}",
         "--parent-pid", str(os.getpid()), "--wake-fd", str(wake_r)],
        stdin=subprocess.DEVNULL, pass_fds=(wake_r,),
    )
    os.close(wake_r)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    args = list(flower_args) if ns.isolation else [*flower_args, "--isolation", "process"]
    sys.argv = ["flower-supernode", *args]
    try:
        flower_supernode()
    finally:
        if superexec.poll() is None:
            superexec.terminate()


def warm_supernode_argv(flower_args: Sequence[str], poll_s: float = DEFAULT_POLL_S) -> list[str]:
    """The command line that runs ``flower-supernode FLOWER_ARGS`` warm."""
    return [sys.executable, "-m", "federation.warm_node", "--poll-s", repr(float(poll_s)), "--", *flower_args]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["superexec"]:
        _superexec(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m federation.warm_node",
                                     description="flower-supernode with warm ClientApps and short polls")
    parser.add_argument("--poll-s", type=float, default=DEFAULT_POLL_S,
                        help="cap on the SuperNode's message and reply polls (Flower: 3 s / 0.5 s)")
    parser.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- then flower-supernode's arguments")
    args = parser.parse_args(argv)
    rest = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    if not 0.0 < args.poll_s <= 3.0:
        parser.error(f"--poll-s {args.poll_s} is outside (0, 3]")
    _supernode(args.poll_s, rest)


if __name__ == "__main__":
    # Through the module's real name, so the fork server's children find ``_run_clientapp`` there.
    from federation.warm_node import main as _main

    _main()
