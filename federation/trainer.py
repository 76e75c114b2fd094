"""A region's trainer: the ClientApp's work (model, data, local training or evaluation), in or out of process.

Flower 1.41's SuperNode starts a new ``flwr-clientapp`` process for every message, and in that
process importing torch alone takes 2.5–5 s of CPU on an idle core (15–20 s on a loaded 2-core
box), every round, for every region. ``edgefed fed supernode`` therefore starts, next to its
SuperNode, one long-lived trainer process per region (``python -m federation.trainer``) that imports
torch once and serves the ClientApp's requests over a Unix socket; the ClientApp stays a thin
client that never imports torch. Flower still does everything it did: the SuperLink sends the
message, the SuperNode starts the ClientApp, the ClientApp's reply travels back through Flower.

``run_task`` is the work itself (the same code in the trainer and, without a trainer, inside the
ClientApp). The socket is 0600 and every connection must prove it knows the key in
``<socket>.key`` (0600; ``multiprocessing.connection``'s HMAC challenge) before anything it sends is
read, so only processes of the same user that can read the key talk to the trainer. The trainer
exits when its parent (the ``edgefed fed supernode`` wrapper) is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TrainerError", "run_task", "request", "serve", "key_path", "wait_ready", "trainer_argv"]

log = logging.getLogger(__name__)


class TrainerError(RuntimeError):
    """The trainer could not be reached or could not do the task; the message says why."""


def key_path(socket_path: Path) -> Path:
    return Path(f"{socket_path}.key")


_LAST_DATA: dict[str, Any] = {}
"""The region data this process loaded last, with the directory's stamp: a long-lived trainer reads
its region's cases again only when a file there changed (training never modifies the tensors)."""


def _data_stamp(data_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """Path, size and modification time of every file ``load_region_data`` reads (stores with their
    WAL, .npz files); any change, a new file or a removed one gives another stamp."""
    from federation.region_cache import CACHE_DIR

    files = [*data_dir.rglob("learning*.sqlite3*"), *data_dir.rglob("*.npz")]
    out = []
    for f in sorted(files):
        if CACHE_DIR in f.relative_to(data_dir).parts or f.name.endswith("-shm"):  # not cases: the decoded
            continue  # cache the first read writes, SQLite's shared-memory index
        try:
            st = f.stat()
        except OSError:  # removed meanwhile: the stamp differs anyway
            continue
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def run_task(op: str, cfg: Mapping[str, Any], arrays: dict[str, np.ndarray], data_dir: Path, *,
             threads: int = 1) -> tuple[dict[str, np.ndarray] | None, dict[str, float]]:
    """Train (``op="train"``) or evaluate (``op="evaluate"``) the global model on the region's data.

    ``cfg`` is the ServerApp's config record as a mapping, ``arrays`` the global weights. Returns the
    new weights (None for evaluation) and the metrics, with the timings ``import-s``, ``model-s``,
    ``data-s``, ``setup-s``, ``compute-s``, ``pack-s`` and ``data-cache-hits``.
    """
    if op not in ("train", "evaluate"):
        raise ValueError(f"unknown trainer task {op!r}; use train or evaluate")
    t0 = time.perf_counter()
    import torch

    from federation.reference import load_region_data
    from federation.training import evaluate, load_arrays, state_to_arrays, train_local
    from shared.models import build_model

    t1 = time.perf_counter()
    torch.set_num_threads(int(threads))
    model = build_model(str(cfg["arch"]), **json.loads(str(cfg["arch-kwargs"])))
    load_arrays(model, arrays)
    t2 = time.perf_counter()
    chw = tuple(int(v) for v in json.loads(str(cfg["input-chw"])))
    key = (str(Path(data_dir).resolve()), str(cfg["task"]), int(cfg["num-classes"]), chw)
    stamp = _data_stamp(Path(data_dir))
    if _LAST_DATA.get("key") == key and _LAST_DATA.get("stamp") == stamp:
        data, info = _LAST_DATA["data"], {**_LAST_DATA["info"], "memory_hit": 1}
    else:
        data, info = load_region_data(Path(data_dir), task=str(cfg["task"]), num_classes=int(cfg["num-classes"]),
                                      input_chw=chw)  # type: ignore[arg-type]
        # Stamped after reading: closing SQLite may checkpoint its WAL into the store, which changes
        # the files but not the cases just read.
        _LAST_DATA.update(key=key, stamp=_data_stamp(Path(data_dir)), data=data, info=info)
    t3 = time.perf_counter()
    metrics: dict[str, float] = {"import-s": t1 - t0, "model-s": t2 - t1, "data-s": t3 - t2, "setup-s": t3 - t0,
                                 "data-cache-hits": float(info.get("cache_hits", 0)),
                                 "data-memory-hit": float(info.get("memory_hit", 0))}
    if op == "evaluate":
        result = evaluate(model, data)
        if result["num-examples"] == 0:
            raise ValueError(f"no labelled cases to evaluate on under {data_dir}")
        metrics.update(result)
        metrics["compute-s"] = time.perf_counter() - t3
        return None, metrics
    metrics.update(train_local(
        model, data, epochs=int(cfg["local-epochs"]), lr=float(cfg["lr"]), batch_size=int(cfg["batch-size"]),
        soft_weight=float(cfg["soft-weight"]), proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        seed=int(cfg.get("seed", 0)) + int(cfg.get("server-round", 0)),
    ))
    t4 = time.perf_counter()
    out = state_to_arrays(model)
    metrics["pack-s"] = time.perf_counter() - t4
    return out, metrics


def request(socket_path: Path, op: str, cfg: Mapping[str, Any], arrays: dict[str, np.ndarray]) -> tuple[
    dict[str, np.ndarray] | None, dict[str, float]
]:
    """Ask the trainer at ``socket_path`` to run ``run_task``; the data directory is the trainer's own."""
    try:
        key = key_path(socket_path).read_bytes()
        conn = Client(str(socket_path), family="AF_UNIX", authkey=key)
    except (OSError, EOFError) as exc:
        raise TrainerError(f"trainer at {socket_path} is not reachable: {exc}") from None
    with conn:
        try:
            conn.send({"op": op, "config": dict(cfg), "arrays": arrays})
            reply = conn.recv()
        except (OSError, EOFError) as exc:
            raise TrainerError(f"trainer at {socket_path} went away during the task: {exc}") from None
    if reply.get("error"):
        raise TrainerError(f"trainer at {socket_path}: {reply['error']}")
    return reply.get("arrays"), reply["metrics"]


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            log.warning("trainer: parent process %d is gone; exiting", parent_pid)
            os._exit(0)
        time.sleep(1.0)


def serve(socket_path: Path, data_dir: Path, *, threads: int = 1, parent_pid: int | None = None) -> None:
    """Serve requests on ``socket_path`` one at a time until SIGTERM (or the parent is gone)."""
    import torch  # once, here: the point of this process

    import federation.training  # noqa: F401 - the training code, loaded once
    import shared.models  # noqa: F401

    torch.set_num_threads(int(threads))
    socket_path = Path(socket_path)
    socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    key = secrets.token_bytes(32)
    kp = key_path(socket_path)
    fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    listener = Listener(str(socket_path), family="AF_UNIX", authkey=key)
    os.chmod(socket_path, 0o600)
    log.info("trainer for %s listening on %s", data_dir, socket_path)
    try:
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError) as exc:  # a peer without the key, or one that hung up
                log.warning("trainer: refused a connection: %s", exc)
                continue
            with conn:
                try:
                    req = conn.recv()
                    arrays, metrics = run_task(str(req["op"]), req["config"], req["arrays"], data_dir,
                                               threads=threads)
                    reply: dict[str, Any] = {"arrays": arrays, "metrics": metrics}
                except Exception as exc:  # the task's failure goes back to the ClientApp, the trainer stays
                    log.exception("trainer: task failed")
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                with contextlib.suppress(OSError):
                    conn.send(reply)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            kp.unlink()


def trainer_argv(socket_path: Path, data_dir: Path, *, threads: int = 1, parent_pid: int | None = None) -> list[str]:
    """The command line of a trainer process (this interpreter, ``-m federation.trainer``)."""
    argv = [sys.executable, "-m", "federation.trainer", "--socket", str(socket_path), "--data-dir",
            str(Path(data_dir).resolve()), "--threads", str(int(threads))]
    if parent_pid is not None:
        argv += ["--parent-pid", str(parent_pid)]
    return argv


def wait_ready(socket_path: Path, timeout: float, alive: Any = None) -> None:
    """Wait until the trainer listens (its socket and key exist), or raise ``TimeoutError``/``TrainerError``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise TrainerError(f"trainer for {socket_path} exited before it listened")
        if Path(socket_path).exists() and key_path(socket_path).exists():
            return
        time.sleep(0.1)
    raise TimeoutError(f"trainer did not listen on {socket_path} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> None:
    """``python -m federation.trainer --socket S --data-dir D [--threads N --parent-pid P]`` (internal)."""
    ap = argparse.ArgumentParser(prog="python -m federation.trainer", description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parent-pid", type=int, default=None)
    args = ap.parse_args(argv)
    if not args.data_dir.is_dir():
        ap.error(f"--data-dir {args.data_dir} is not a directory")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(args.socket, args.data_dir, threads=args.threads, parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
