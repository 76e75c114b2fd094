"""Starting Flower's SuperLink and SuperNodes: the argument lists, and a local deployment for tests/bench.

``superlink_argv`` / ``supernode_argv`` build the ``flower-superlink`` / ``flower-supernode`` command
lines that ``edgefed fed superlink|supernode`` run (offline: runs never install dependencies;
``--insecure`` unless TLS files are given). ``FlowerDeployment`` starts one SuperLink and N
SuperNodes on free loopback ports with their own ``FLWR_HOME`` under one directory, each in its own
process group (``shared.processes.ManagedProcess``), so that stopping them also stops the SuperExec,
ServerApp and ClientApp processes they spawned; by default each region also gets its long-lived
trainer (``federation.trainer``). ``flwr_env`` sets Flower's SuperExec task poll
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, 0.2 s instead of Flower's 1 s) and the ServerApp's reply poll.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shared.processes import ManagedProcess, free_port, wait_for_port

__all__ = [
    "TlsFiles", "FlowerDeployment", "flower_executable", "superlink_argv", "supernode_argv", "node_config",
    "flwr_env", "descendants", "kill_leftovers", "stop_tree", "alive_pids", "DEFAULT_TASK_POLL_S",
]


@dataclass(frozen=True)
class TlsFiles:
    """TLS material; all None means ``--insecure`` (development)."""

    certfile: Path | None = None
    keyfile: Path | None = None
    ca_certfile: Path | None = None

    @property
    def enabled(self) -> bool:
        return any(p is not None for p in (self.certfile, self.keyfile, self.ca_certfile))


def flower_executable(name: str) -> str:
    """The Flower console script next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH; install flwr (edgefed[hub])")
    return found


def superlink_argv(
    host: str = "127.0.0.1",
    port: int = 9093,
    *,
    tls: TlsFiles = TlsFiles(),
    database: Path | None = None,
    enable_supernode_auth: bool = False,
    health_address: str | None = None,
) -> list[str]:
    """``flower-superlink`` serving Fleet, Control and Runtime APIs over HTTP on ``host:port``."""
    argv = [flower_executable("flower-superlink"), "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if tls.enabled:
        if tls.certfile is None or tls.keyfile is None:
            raise ValueError("TLS needs both a certificate file and a key file")
        argv += ["--ssl-certfile", str(tls.certfile), "--ssl-keyfile", str(tls.keyfile)]
        if tls.ca_certfile is not None:
            argv += ["--ssl-ca-certfile", str(tls.ca_certfile)]
    else:
        argv.append("--insecure")
    if database is not None:
        argv += ["--database", str(database)]
    if enable_supernode_auth:
        argv.append("--enable-supernode-auth")
    if health_address:
        argv += ["--health-server-address", health_address]
    return argv


def node_config(region: str, data_dir: Path, threads: int = 1, trainer_socket: Path | None = None) -> str:
    """The ``--node-config`` string that tells the ClientApp its region, data directory and (optionally) the
    Unix socket of the region's trainer process (``federation.trainer``)."""
    if not region or any(c in region for c in "\"'\\\n"):
        raise ValueError(f"region name {region!r} must be non-empty and free of quotes, backslashes and newlines")
    paths = [str(Path(data_dir).resolve())] + ([] if trainer_socket is None else [str(trainer_socket)])
    for d in paths:
        if any(c in d for c in "\"\\\n"):
            raise ValueError(f"path {d!r} must not contain quotes, backslashes or newlines")
    out = f'region="{region}" data-dir="{paths[0]}" threads={int(threads)}'
    return out if trainer_socket is None else f'{out} trainer="{paths[1]}"'


def supernode_argv(
    region: str,
    data_dir: Path,
    *,
    superlink: str = "127.0.0.1:9093",
    host: str = "127.0.0.1",
    port: int = 9094,
    root_certificates: Path | None = None,
    auth_private_key: Path | None = None,
    threads: int = 1,
    max_retries: int | None = None,
    trainer_socket: Path | None = None,
    warm: bool = True,
    poll_s: float | None = None,
) -> list[str]:
    """``flower-supernode`` for one region, connected to ``superlink``; its Runtime API on ``host:port``.

    ``warm`` (default): through ``federation.warm_node`` (ClientApps forked from a warm fork server,
    SuperNode polls capped at ``poll_s``, default ``warm_node.DEFAULT_POLL_S``); else Flower's plain
    ``flower-supernode``.
    """
    args = ["--superlink", superlink, "--host", host, "--port", str(port),
            "--node-config", node_config(region, data_dir, threads, trainer_socket)]
    if warm:
        from federation.warm_node import DEFAULT_POLL_S, warm_supernode_argv

        argv = warm_supernode_argv(args, DEFAULT_POLL_S if poll_s is None else poll_s)
    else:
        argv = [flower_executable("flower-supernode"), *args]
    if root_certificates is not None:
        argv += ["--root-certificates", str(root_certificates)]
    else:
        argv.append("--insecure")
    if auth_private_key is not None:
        argv += ["--auth-supernode-private-key", str(auth_private_key)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    return argv


DEFAULT_TASK_POLL_S = 0.2
"""How often a SuperExec asks its SuperLink/SuperNode for a task to start (Flower's default: 1 s)."""


def flwr_env(flwr_home: Path, extra: dict[str, str] | None = None, *, task_poll_s: float | None = None,
             reply_poll_s: float | None = None) -> dict[str, str]:
    """The environment for a Flower process with its own ``FLWR_HOME``.

    ``task_poll_s`` sets Flower's ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (how soon a SuperExec starts a
    ServerApp/ClientApp process for a new message; default ``DEFAULT_TASK_POLL_S`` unless the
    variable is already set); ``reply_poll_s`` sets ``EDGEFED_FED_REPLY_POLL_S`` for the ServerApp
    (``federation.messaging``).
    """
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    if task_poll_s is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = repr(float(task_poll_s))
    else:
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", repr(DEFAULT_TASK_POLL_S))
    if reply_poll_s is not None:
        env["EDGEFED_FED_REPLY_POLL_S"] = repr(float(reply_poll_s))
    # The SuperLink/SuperNode start flower-superexec, flwr-serverapp and flwr-clientapp by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Flower's telemetry would try to reach the internet; these machines are offline.
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.update(extra or {})
    return env


@dataclass
class FlowerDeployment:
    """One SuperLink and N SuperNodes on loopback, everything under ``root``.

    ``regions`` maps region name to its data directory. ``start()`` waits until the SuperLink
    listens, every region's trainer (``trainers=True``, ``federation.trainer``) listens and every
    SuperNode process is up; ``stop()`` stops every process group it started.
    """

    root: Path
    regions: dict[str, Path]
    threads_per_node: int = 1
    env: dict[str, str] = field(default_factory=dict)
    task_poll_s: float | None = None  # SuperExec task poll (None: DEFAULT_TASK_POLL_S)
    reply_poll_s: float | None = None  # ServerApp reply poll (None: federation.messaging's default)
    trainers: bool = True  # a long-lived trainer process per region (the ClientApp then never imports torch)
    warm: bool = True  # SuperNodes through federation.warm_node (warm ClientApps, short polls)
    node_poll_s: float | None = None  # the warm SuperNodes' poll cap (None: warm_node.DEFAULT_POLL_S)
    superlink: ManagedProcess | None = None
    supernodes: dict[str, ManagedProcess] = field(default_factory=dict)
    trainer_procs: dict[str, ManagedProcess] = field(default_factory=dict)
    _socket_dirs: list[Path] = field(default_factory=list)
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def flwr_home(self) -> Path:
        """The FLWR_HOME that ``flwr run``/``FederationClient`` should use for this deployment."""
        return self.root / "flwr-home-cli"

    def start(self, timeout: float = 30.0) -> FlowerDeployment:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.superlink = ManagedProcess(
            "superlink", superlink_argv(port=self.port), self.root / "logs" / "superlink.log",
            env=flwr_env(self.root / "flwr-home-superlink", self.env, task_poll_s=self.task_poll_s,
                         reply_poll_s=self.reply_poll_s),
        ).start()
        try:
            wait_for_port("127.0.0.1", self.port, timeout, alive=self.superlink.alive)
            if self.trainers:  # all at once: each imports torch before it listens
                for region, data_dir in self.regions.items():
                    self._start_trainer(region, data_dir)
            for region, data_dir in self.regions.items():
                self.start_supernode(region, data_dir)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_trainer(self, region: str, data_dir: Path) -> ManagedProcess:
        from federation.trainer import trainer_argv

        sock_dir = Path(tempfile.mkdtemp(prefix="edgefed-tr-"))  # short: Unix socket paths have ~100 bytes
        self._socket_dirs.append(sock_dir)
        proc = ManagedProcess(
            f"trainer-{region}", trainer_argv(sock_dir / "trainer.sock", data_dir, threads=self.threads_per_node,
                                              parent_pid=os.getpid()),
            self.root / "logs" / f"trainer-{_safe(region)}.log", env={**os.environ, **self.env},
        ).start()
        self.trainer_procs[region] = proc
        return proc

    def start_supernode(self, region: str, data_dir: Path, timeout: float = 180.0) -> ManagedProcess:
        """Start region ``region``'s SuperNode (after its trainer, when ``trainers``; waits until that listens)."""
        from federation.trainer import wait_ready

        safe = _safe(region)
        sock = None
        if self.trainers:
            trainer = self.trainer_procs.get(region) or self._start_trainer(region, data_dir)
            sock = Path(trainer.argv[trainer.argv.index("--socket") + 1])
            wait_ready(sock, timeout, alive=trainer.alive)
        proc = ManagedProcess(
            f"supernode-{region}",
            supernode_argv(region, data_dir, superlink=self.address, port=free_port(), threads=self.threads_per_node,
                           trainer_socket=sock, warm=self.warm, poll_s=self.node_poll_s),
            self.root / "logs" / f"supernode-{safe}.log",
            env=flwr_env(self.root / f"flwr-home-{safe}", self.env, task_poll_s=self.task_poll_s),
        ).start()
        self.supernodes[region] = proc
        return proc

    def process_groups(self) -> list[int]:
        """The process-group ids this deployment started (each leader's pid)."""
        procs = [self.superlink, *self.supernodes.values(), *self.trainer_procs.values()]
        return [p.pid for p in procs if p is not None and p.proc is not None]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every process group at once, SIGKILL what is left after ``timeout``, then stop
        any detached descendant (SuperExec and its apps) still alive."""
        procs = [p for p in [*self.supernodes.values(), *self.trainer_procs.values(), self.superlink]
                 if p is not None and p.proc is not None]
        tree = [d for p in procs if p.alive() for d in descendants(p.pid)]
        for p in procs:
            if p.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(p.alive() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in procs:
            p.stop(timeout=1.0)  # SIGKILLs the group (and any member left behind by its leader)
        kill_leftovers(tree, timeout=timeout)
        for d in self._socket_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def all_pids(self) -> list[tuple[int, int]]:
        """(pid, start time) of every process of this deployment now: leaders and their descendants."""
        out: list[tuple[int, int]] = []
        for p in [self.superlink, *self.supernodes.values(), *self.trainer_procs.values()]:
            if p is not None and p.alive():
                out.append((p.pid, _start_time(p.pid)))
                out += descendants(p.pid)
        return out

    def logs(self, lines: int = 20) -> str:
        procs: Sequence[ManagedProcess | None] = [self.superlink, *self.supernodes.values(),
                                                  *self.trainer_procs.values()]
        return "\n".join(f"--- {p.name}\n{p.log_tail(lines)}" for p in procs if p is not None)

    def __enter__(self) -> FlowerDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every living descendant of ``pid``, from /proc.

    Flower's SuperLink and SuperNode start ``flower-superexec`` in a new session
    (``start_new_session=True``), so those processes and the ServerApp/ClientApp processes they
    spawn are not in the process group we created; they watch their parent and exit when it goes,
    and ``stop_tree`` makes sure of it. The start time guards against a reused pid.
    """
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields_ = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ppid, start = int(fields_[1]), int(fields_[19])
        children.setdefault(ppid, []).append(int(entry.name))
        starts[int(entry.name)] = start
    out: list[tuple[int, int]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append((child, starts[child]))
            todo.append(child)
    return out


def _same_process(pid: int, start: int) -> bool:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]) == start
    except (OSError, ValueError, IndexError):
        return False


def kill_leftovers(procs: Sequence[tuple[int, int]], timeout: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``timeout``, the listed processes still alive; return pids that had to be killed."""
    alive = [(p, s) for p, s in procs if _same_process(p, s)]
    for p, _ in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [(p, s) for p, s in alive if _same_process(p, s)]
    for p, _ in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    return [p for p, _ in alive]


def stop_tree(proc: ManagedProcess, timeout: float = 5.0) -> None:
    """Stop a Flower process: its process group, then any detached descendants (SuperExec and its apps)."""
    if proc.proc is None:
        return
    tree = descendants(proc.pid) if proc.alive() else []
    proc.stop(timeout=timeout)
    kill_leftovers(tree, timeout=timeout)


def group_alive(pgid: int) -> bool:
    """True while any process of process group ``pgid`` exists."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _start_time(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return -1


def alive_pids(procs: Sequence[tuple[int, int]]) -> list[int]:
    """The pids of ``procs`` that still run (same start time)."""
    return [p for p, s in procs if _same_process(p, s)]


def wait_groups_gone(pgids: Sequence[int], timeout: float = 10.0) -> list[int]:
    """Wait until the groups are gone; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = list(pgids)
    while alive and time.monotonic() < deadline:
        alive = [g for g in alive if group_alive(g)]
        if alive:
            time.sleep(0.1)
    return alive


def quote_argv(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def run_foreground(argv: Sequence[str], env: dict[str, str], stop_timeout: float = 10.0,
                   companions: Sequence[subprocess.Popen[bytes]] = ()) -> int:
    """Run a Flower process in its own process group with our stdout; stop it and its children on SIGTERM/SIGINT.

    On a signal: note the process tree (including the detached SuperExec and its apps), SIGTERM the
    group, SIGKILL it after ``stop_timeout``, then stop any descendant still alive. ``companions``
    (already started in their own process groups, e.g. the region's trainer) are stopped with it, and
    if one of them exits, the Flower process is stopped too (exit code 1). Returns the exit code.
    """
    proc = subprocess.Popen(list(argv), env=env, start_new_session=True, stdin=subprocess.DEVNULL)
    stopping: list[int] = []

    def _on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    companion_died = False
    try:
        while proc.poll() is None and not stopping:
            if any(c.poll() is not None for c in companions):
                companion_died = True
                print(f"{Path(argv[0]).name}: a companion process exited; stopping", file=sys.stderr)
                break
            time.sleep(0.2)
        tree = descendants(proc.pid) if proc.poll() is None else []
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        kill_leftovers(tree, timeout=stop_timeout)
        stop_popen_groups(companions, stop_timeout)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if companion_died:
        return 1
    return 0 if stopping and proc.returncode in (0, -signal.SIGTERM, -signal.SIGINT) else int(proc.returncode or 0)


def stop_popen_groups(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM the process groups led by ``procs`` (started with ``start_new_session``), SIGKILL after ``timeout``."""
    for c in procs:
        if c.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for c in procs:
        try:
            c.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(c.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.wait(5)
