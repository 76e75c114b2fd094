"""``edgefed fed superlink`` and ``edgefed fed supernode``: Flower's processes with the project's settings.

Both run the Flower process in its own process group in the foreground and, on SIGTERM/SIGINT,
stop it together with the SuperExec and app processes it started (``federation.processes``). The
SuperNode wrapper also starts the region's long-lived trainer (``federation.trainer``; ``--no-trainer``
to train inside each ClientApp process instead) and stops it with the SuperNode. Runs
never install dependencies (the app's code is the installed edgefed). Development default is
``--insecure`` on loopback; give TLS files (and SuperNode keys) for anything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["superlink", "supernode"]


def superlink(
    host: Annotated[str, typer.Option(envvar="EDGEFED_SUPERLINK_HOST",
                                      help="Address for the Fleet, Control and Runtime HTTP APIs.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="EDGEFED_SUPERLINK_PORT", min=1, max=65535,
                                      help="Port for the Fleet, Control and Runtime HTTP APIs.")] = 9093,
    flwr_home: Annotated[Path, typer.Option(envvar="EDGEFED_SUPERLINK_FLWR_HOME",
                                            help="FLWR_HOME of the SuperLink (installed apps, state).")]
    = Path(".edgefed/flwr-superlink"),
    database: Annotated[Path | None, typer.Option(envvar="EDGEFED_SUPERLINK_DATABASE",
                                                  help="SQLite file for the SuperLink's state (default: in memory).")]
    = None,
    ssl_certfile: Annotated[Path | None, typer.Option(envvar="EDGEFED_SUPERLINK_SSL_CERTFILE",
                                                      help="TLS certificate (PEM); with --ssl-keyfile turns TLS on.")]
    = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(envvar="EDGEFED_SUPERLINK_SSL_KEYFILE",
                                                     help="TLS private key (PEM).")] = None,
    ssl_ca_certfile: Annotated[Path | None, typer.Option(envvar="EDGEFED_SUPERLINK_SSL_CA_CERTFILE",
                                                         help="CA certificate (PEM) of the TLS certificate.")] = None,
    enable_supernode_auth: Annotated[bool, typer.Option(envvar="EDGEFED_SUPERLINK_SUPERNODE_AUTH",
                                                        help="Only admit SuperNodes whose public key is registered "
                                                             "(`flwr supernode register`).")] = False,
    task_poll_s: Annotated[float, typer.Option(envvar="EDGEFED_FED_TASK_POLL_S", min=0.01, max=60.0,
                                               help="How often the SuperExec asks for a new task to start "
                                                    "(Flower's FLWR_SUPEREXEC_TASK_POLL_INTERVAL; Flower's "
                                                    "default is 1 s).")] = 0.2,
    reply_poll_s: Annotated[float, typer.Option(envvar="EDGEFED_FED_REPLY_POLL_S", min=0.01, max=10.0,
                                                help="How often the ServerApp asks for the round's replies "
                                                     "(Flower's own loop waits 3 s).")] = 0.2,
    print_command: Annotated[bool, typer.Option(envvar="EDGEFED_FED_PRINT_COMMAND",
                                                help="Print the Flower command line and exit.")] = False,
) -> None:
    """Run Flower's SuperLink (offline: runs never install dependencies)."""
    from federation.processes import TlsFiles, flwr_env, quote_argv, run_foreground, superlink_argv

    tls = TlsFiles(ssl_certfile, ssl_keyfile, ssl_ca_certfile)
    for label, p in (("--ssl-certfile", ssl_certfile), ("--ssl-keyfile", ssl_keyfile),
                     ("--ssl-ca-certfile", ssl_ca_certfile)):
        if p is not None and not p.is_file():
            raise typer.BadParameter(f"{p} does not exist", param_hint=label)
    try:
        argv = superlink_argv(host, port, tls=tls, database=database, enable_supernode_auth=enable_supernode_auth)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if print_command:
        typer.echo(quote_argv(argv))
        return
    flwr_home.mkdir(parents=True, exist_ok=True)
    typer.echo(f"SuperLink on {host}:{port} ({'TLS' if tls.enabled else 'insecure, development only'}); "
               f"FLWR_HOME={flwr_home}", err=True)
    raise typer.Exit(run_foreground(argv, flwr_env(flwr_home.resolve(), task_poll_s=task_poll_s,
                                                   reply_poll_s=reply_poll_s)))


def supernode(
    region: Annotated[str, typer.Option(envvar="EDGEFED_REGION", help="Region this SuperNode trains for.")],
    data_dir: Annotated[Path, typer.Option(envvar="EDGEFED_SUPERNODE_DATA_DIR",
                                           help="Directory with the region's learning stores (learning*.sqlite3, "
                                                "searched recursively) and/or labelled .npz files.")],
    superlink: Annotated[str, typer.Option(envvar="EDGEFED_SUPERLINK",
                                           help="SuperLink HOST:PORT (its Fleet API).")] = "127.0.0.1:9093",
    host: Annotated[str, typer.Option(envvar="EDGEFED_SUPERNODE_HOST",
                                      help="Address of this SuperNode's Runtime API.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="EDGEFED_SUPERNODE_PORT", min=1, max=65535,
                                      help="Port of this SuperNode's Runtime API.")] = 9094,
    flwr_home: Annotated[Path | None, typer.Option(envvar="EDGEFED_SUPERNODE_FLWR_HOME",
                                                   help="FLWR_HOME of this SuperNode (default "
                                                        ".edgefed/flwr-supernode-<region>).")] = None,
    threads: Annotated[int, typer.Option(envvar="EDGEFED_SUPERNODE_THREADS", min=1,
                                         help="torch threads of the trainer (or of each ClientApp process "
                                              "with --no-trainer).")] = 1,
    root_certificates: Annotated[Path | None, typer.Option(envvar="EDGEFED_SUPERNODE_ROOT_CERTIFICATES",
                                                           help="CA certificate (PEM) that verifies the "
                                                                "SuperLink's TLS certificate; turns TLS on.")]
    = None,
    auth_private_key: Annotated[Path | None, typer.Option(envvar="EDGEFED_SUPERNODE_AUTH_PRIVATE_KEY",
                                                          help="This SuperNode's private key (SuperLink with "
                                                               "--enable-supernode-auth).")] = None,
    task_poll_s: Annotated[float, typer.Option(envvar="EDGEFED_FED_TASK_POLL_S", min=0.01, max=60.0,
                                               help="How often the SuperExec asks for a new task to start "
                                                    "(Flower's FLWR_SUPEREXEC_TASK_POLL_INTERVAL; Flower's "
                                                    "default is 1 s).")] = 0.2,
    trainer: Annotated[bool, typer.Option(envvar="EDGEFED_SUPERNODE_TRAINER",
                                          help="Start a long-lived trainer process next to the SuperNode (torch, "
                                               "training code loaded once); the ClientApp Flower starts per "
                                               "message hands it the work over a Unix socket.")] = True,
    trainer_socket: Annotated[Path | None, typer.Option(envvar="EDGEFED_SUPERNODE_TRAINER_SOCKET",
                                                        help="Unix socket of the trainer (default: in a new "
                                                             "private temporary directory).")] = None,
    warm: Annotated[bool, typer.Option(envvar="EDGEFED_SUPERNODE_WARM",
                                       help="Fork each ClientApp from a warm fork server and cap the SuperNode's "
                                            "polls at --poll-s (federation.warm_node); --no-warm: Flower's plain "
                                            "flower-supernode, a new process per message, 3 s polls.")] = True,
    poll_s: Annotated[float, typer.Option(envvar="EDGEFED_SUPERNODE_POLL_S", min=0.01, max=3.0,
                                          help="With --warm: the SuperNode's message/reply poll (Flower: 3 s / "
                                               "0.5 s).")] = 0.2,
    print_command: Annotated[bool, typer.Option(envvar="EDGEFED_FED_PRINT_COMMAND",
                                                help="Print the Flower command line and exit.")] = False,
) -> None:
    """Run Flower's SuperNode for one region (and its trainer); the ClientApp reads that region's data directory."""
    import os
    import shutil
    import subprocess
    import tempfile

    from federation.processes import flwr_env, quote_argv, run_foreground, stop_popen_groups, supernode_argv
    from federation.trainer import TrainerError, key_path, trainer_argv, wait_ready

    if not data_dir.is_dir():
        raise typer.BadParameter(f"{data_dir} is not a directory", param_hint="--data-dir")
    for label, p in (("--root-certificates", root_certificates), ("--auth-private-key", auth_private_key)):
        if p is not None and not p.is_file():
            raise typer.BadParameter(f"{p} does not exist", param_hint=label)
    if ":" not in superlink or "://" in superlink:
        raise typer.BadParameter(f"{superlink!r} is not HOST:PORT", param_hint="--superlink")
    if trainer_socket is not None and len(str(trainer_socket.resolve())) > 100:
        raise typer.BadParameter(f"{trainer_socket} is too long for a Unix socket path", param_hint="--trainer-socket")
    sock_dir = None
    sock = trainer_socket.resolve() if trainer_socket is not None else None
    if trainer and sock is None:
        sock_dir = Path(tempfile.mkdtemp(prefix="edgefed-tr-"))
        sock = sock_dir / "trainer.sock"
    try:
        try:
            argv = supernode_argv(region, data_dir, superlink=superlink, host=host, port=port,
                                  root_certificates=root_certificates, auth_private_key=auth_private_key,
                                  threads=threads, trainer_socket=sock if trainer else None, warm=warm,
                                  poll_s=poll_s)
        except (ValueError, FileNotFoundError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--region") from None
        trainer_cmd = trainer_argv(sock, data_dir, threads=threads, parent_pid=os.getpid()) if trainer and sock else []
        if print_command:
            if trainer_cmd:
                typer.echo(quote_argv(trainer_cmd))
            typer.echo(quote_argv(argv))
            return
        home = flwr_home or Path(".edgefed") / f"flwr-supernode-{region}"
        home.mkdir(parents=True, exist_ok=True)
        companions = []
        if trainer_cmd and sock is not None:
            for stale in (sock, key_path(sock)):  # a socket left by a killed trainer must not look ready
                stale.unlink(missing_ok=True)
            typer.echo(f"trainer for {region!r} on {sock} (loading torch)", err=True)
            companions.append(subprocess.Popen(trainer_cmd, start_new_session=True, stdin=subprocess.DEVNULL))
            try:
                wait_ready(sock, 300.0, alive=lambda: companions[0].poll() is None)  # type: ignore[arg-type]
            except (TimeoutError, TrainerError) as exc:
                stop_popen_groups(companions)
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from None
        typer.echo(f"SuperNode {region!r} -> {superlink}, data {data_dir}", err=True)
        code = run_foreground(argv, flwr_env(home.resolve(), task_poll_s=task_poll_s), companions=companions)
    finally:
        if sock_dir is not None:
            shutil.rmtree(sock_dir, ignore_errors=True)
    raise typer.Exit(code)
