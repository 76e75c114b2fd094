"""``edgefed fed superlink`` and ``edgefed fed supernode``: Flower's processes with the project's settings.

Both run the Flower process in its own process group in the foreground and, on SIGTERM/SIGINT,
stop it together with the SuperExec and app processes it started (``federation.processes``). Runs
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
    raise typer.Exit(run_foreground(argv, flwr_env(flwr_home.resolve())))


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
                                         help="torch threads per ClientApp process.")] = 1,
    root_certificates: Annotated[Path | None, typer.Option(envvar="EDGEFED_SUPERNODE_ROOT_CERTIFICATES",
                                                           help="CA certificate (PEM) that verifies the "
                                                                "SuperLink's TLS certificate; turns TLS on.")]
    = None,
    auth_private_key: Annotated[Path | None, typer.Option(envvar="EDGEFED_SUPERNODE_AUTH_PRIVATE_KEY",
                                                          help="This SuperNode's private key (SuperLink with "
                                                               "--enable-supernode-auth).")] = None,
    print_command: Annotated[bool, typer.Option(envvar="EDGEFED_FED_PRINT_COMMAND",
                                                help="Print the Flower command line and exit.")] = False,
) -> None:
    """Run Flower's SuperNode for one region; the ClientApp reads that region's data directory."""
    from federation.processes import flwr_env, quote_argv, run_foreground, supernode_argv

    if not data_dir.is_dir():
        raise typer.BadParameter(f"{data_dir} is not a directory", param_hint="--data-dir")
    for label, p in (("--root-certificates", root_certificates), ("--auth-private-key", auth_private_key)):
        if p is not None and not p.is_file():
            raise typer.BadParameter(f"{p} does not exist", param_hint=label)
    if ":" not in superlink or "://" in superlink:
        raise typer.BadParameter(f"{superlink!r} is not HOST:PORT", param_hint="--superlink")
    try:
        argv = supernode_argv(region, data_dir, superlink=superlink, host=host, port=port,
                              root_certificates=root_certificates, auth_private_key=auth_private_key, threads=threads)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--region") from None
    if print_command:
        typer.echo(quote_argv(argv))
        return
    home = flwr_home or Path(".edgefed") / f"flwr-supernode-{region}"
    home.mkdir(parents=True, exist_ok=True)
    typer.echo(f"SuperNode {region!r} -> {superlink}, data {data_dir}", err=True)
    raise typer.Exit(run_foreground(argv, flwr_env(home.resolve())))
