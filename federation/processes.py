"""Starting Flower's SuperLink and SuperNodes: the argument lists, and a local deployment for tests/bench.

``superlink_argv`` / ``supernode_argv`` build the ``flower-superlink`` / ``flower-supernode`` command
lines that ``edgefed fed superlink|supernode`` run (offline: runs never install dependencies;
``--insecure`` unless TLS files are given). ``FlowerDeployment`` starts one SuperLink and N
SuperNodes on free loopback ports with their own ``FLWR_HOME`` under one directory, each in its own
process group (``shared.processes.ManagedProcess``), so that stopping them also stops the SuperExec,
ServerApp and ClientApp processes they spawned.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shared.processes import ManagedProcess, free_port, wait_for_port

__all__ = [
    "TlsFiles", "FlowerDeployment", "flower_executable", "superlink_argv", "supernode_argv", "node_config",
    "flwr_env", "descendants", "kill_leftovers", "stop_tree", "alive_pids",
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


def node_config(region: str, data_dir: Path, threads: int = 1) -> str:
    """The ``--node-config`` string that tells the ClientApp its region and data directory."""
    if not region or any(c in region for c in "\"'\\\n"):
        raise ValueError(f"region name {region!r} must be non-empty and free of quotes, backslashes and newlines")
    d = str(Path(data_dir).resolve())
    if any(c in d for c in "\"\\\n"):
        raise ValueError(f"data directory {d!r} must not contain quotes, backslashes or newlines")
    return f'region="{region}" data-dir="{d}" threads={int(threads)}'


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
) -> list[str]:
    """``flower-supernode`` for one region, connected to ``superlink``; its Runtime API on ``host:port``."""
    argv = [flower_executable("flower-supernode"), "--superlink", superlink, "--host", host, "--port", str(port),
            "--node-config", node_config(region, data_dir, threads)]
    if root_certificates is not None:
        argv += ["--root-certificates", str(root_certificates)]
    else:
        argv.append("--insecure")
    if auth_private_key is not None:
        argv += ["--auth-supernode-private-key", str(auth_private_key)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    return argv


def flwr_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process with its own ``FLWR_HOME``."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
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
    listens and every SuperNode process is up; ``stop()`` stops every process group it started.
    """

    root: Path
    regions: dict[str, Path]
    threads_per_node: int = 1
    env: dict[str, str] = field(default_factory=dict)
    superlink: ManagedProcess | None = None
    supernodes: dict[str, ManagedProcess] = field(default_factory=dict)
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
            env=flwr_env(self.root / "flwr-home-superlink", self.env),
        ).start()
        try:
            wait_for_port("127.0.0.1", self.port, timeout, alive=self.superlink.alive)
            for region, data_dir in self.regions.items():
                self.start_supernode(region, data_dir)
        except BaseException:
            self.stop()
            raise
        return self

    def start_supernode(self, region: str, data_dir: Path) -> ManagedProcess:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in region)
        proc = ManagedProcess(
            f"supernode-{region}",
            supernode_argv(region, data_dir, superlink=self.address, port=free_port(), threads=self.threads_per_node),
            self.root / "logs" / f"supernode-{safe}.log",
            env=flwr_env(self.root / f"flwr-home-{safe}", self.env),
        ).start()
        self.supernodes[region] = proc
        return proc

    def process_groups(self) -> list[int]:
        """The process-group ids this deployment started (each leader's pid)."""
        procs = [self.superlink, *self.supernodes.values()]
        return [p.pid for p in procs if p is not None and p.proc is not None]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every process group at once, SIGKILL what is left after ``timeout``, then stop
        any detached descendant (SuperExec and its apps) still alive."""
        procs = [p for p in [*self.supernodes.values(), self.superlink] if p is not None and p.proc is not None]
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

    def all_pids(self) -> list[tuple[int, int]]:
        """(pid, start time) of every process of this deployment now: leaders and their descendants."""
        out: list[tuple[int, int]] = []
        for p in [self.superlink, *self.supernodes.values()]:
            if p is not None and p.alive():
                out.append((p.pid, _start_time(p.pid)))
                out += descendants(p.pid)
        return out

    def logs(self, lines: int = 20) -> str:
        procs: Sequence[ManagedProcess | None] = [self.superlink, *self.supernodes.values()]
        return "\n".join(f"--- {p.name}\n{p.log_tail(lines)}" for p in procs if p is not None)

    def __enter__(self) -> FlowerDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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


def run_foreground(argv: Sequence[str], env: dict[str, str], stop_timeout: float = 10.0) -> int:
    """Run a Flower process in its own process group with our stdout; stop it and its children on SIGTERM/SIGINT.

    On a signal: note the process tree (including the detached SuperExec and its apps), SIGTERM the
    group, SIGKILL it after ``stop_timeout``, then stop any descendant still alive. Returns the exit code.
    """
    import subprocess

    proc = subprocess.Popen(list(argv), env=env, start_new_session=True, stdin=subprocess.DEVNULL)
    stopping: list[int] = []

    def _on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while proc.poll() is None and not stopping:
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
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0 if stopping and proc.returncode in (0, -signal.SIGTERM, -signal.SIGINT) else int(proc.returncode or 0)
