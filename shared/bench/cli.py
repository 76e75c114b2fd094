"""``edgefed bench edge | cascade | transport``: benchmarks that each write a JSON result and print
target vs measured. Only typer and the standard library at import time; everything heavy loads
inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["bench_app"]

bench_app = typer.Typer(help="Benchmarks against the product targets; each writes a JSON result.",
                        no_args_is_help=True)

_OUT = Path("bench-results")

ModelsOpt = Annotated[Path | None, typer.Option(
    envvar="EDGEFED_BENCH_MODELS",
    help="Reference models to measure as they are (cloud.pt, edge.pt, bundle/; trained there if absent); "
         "default bench-results/models/<task>, kept up to date with the factory's recipe.")]
KeyOpt = Annotated[Path | None, typer.Option(
    envvar="EDGEFED_BENCH_SIGNING_KEY",
    help="Signing key of the bundle in --models (default <models>/signing.key, created if absent).")]
TaskOpt = Annotated[str, typer.Option(envvar="EDGEFED_BENCH_TASK", help="Task: elpv, elpv4 or fmnist.")]


def _models(models: Path | None, task: str, key: Path | None, limit: int | None):  # noqa: ANN202
    from shared.bench.models import load_eval_data, load_models

    # Models the user points at are measured as they are; the default directory follows the factory.
    m = load_models(models or _OUT / "models" / task, task, signing_key=key, limit=limit, progress=True,
                    reuse=models is not None)
    return m, load_eval_data(m.bundle.manifest)


def _finish(result, out: Path) -> None:  # noqa: ANN001
    from shared.bench.common import print_result, write_result

    print_result(result, write_result(result, out))


@bench_app.command()
def edge(
    models: ModelsOpt = None,
    signing_key: KeyOpt = None,
    task: TaskOpt = "elpv",
    sections: Annotated[str, typer.Option(envvar="EDGEFED_BENCH_SECTIONS",
                                          help="Comma-separated: p1 (INT8 vs FP32), p7 (footprint), p8 (swap).")]
    = "p1,p7,p8",
    runs: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_RUNS", min=10, help="P1 timed runs per model.")] = 500,
    sweep_runs: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_SWEEP_RUNS", min=5,
                                            help="P1 timed runs per session-option config.")] = 150,
    requests: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_REQUESTS", min=10,
                                          help="P7 requests for the RSS run.")] = 10_000,
    starts: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_STARTS", min=1, help="P7 agent starts timed.")] = 3,
    skip_install_size: Annotated[bool, typer.Option(envvar="EDGEFED_BENCH_SKIP_INSTALL",
                                                    help="P7: do not build an edge-only venv (offline).")] = False,
    swaps: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_SWAPS", min=1, help="P8 model swaps.")] = 3,
    clients: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_CLIENTS", min=1,
                                         help="P7/P8 concurrent HTTP clients.")] = 4,
    limit: Annotated[int | None, typer.Option(envvar="EDGEFED_BENCH_LIMIT",
                                              help="Train on a slice (smoke runs only).")] = None,
    out_dir: Annotated[Path, typer.Option(envvar="EDGEFED_BENCH_OUT_DIR", help="Where results go.")] = _OUT,
) -> None:
    """P1 INT8 vs FP32 (+ session-option sweep), P7 footprint, P8 model swap under load."""
    wanted = {s.strip().lower() for s in sections.split(",") if s.strip()}
    unknown = wanted - {"p1", "p7", "p8"}
    if unknown:
        raise typer.BadParameter(f"unknown section(s) {', '.join(sorted(unknown))}; use p1, p7, p8",
                                 param_hint="--sections")
    m, data = _models(models, task, signing_key, limit)
    if "p1" in wanted:
        from shared.bench.edge import run_p1

        _finish(run_p1(m, data, runs=runs, sweep_runs=sweep_runs), out_dir / f"edge-p1-{task}.json")
    if "p7" in wanted:
        from shared.bench.footprint import run_p7

        repo = Path(__file__).resolve().parents[2]
        _finish(run_p7(m, data, repo=repo, skip_install=skip_install_size, starts=starts, requests=requests,
                       clients=clients), out_dir / f"edge-p7-{task}.json")
    if "p8" in wanted:
        from shared.bench.swap import run_p8

        _finish(run_p8(m, data, swaps=swaps, clients=clients), out_dir / f"edge-p8-{task}.json")


@bench_app.command()
def cascade(
    models: ModelsOpt = None,
    signing_key: KeyOpt = None,
    task: TaskOpt = "elpv",
    budget_score: Annotated[str, typer.Option(envvar="EDGEFED_BENCH_BUDGET_SCORE",
                                              help="Score the budget policy ranks by: confidence, margin, entropy.")]
    = "confidence",
    limit: Annotated[int | None, typer.Option(envvar="EDGEFED_BENCH_LIMIT",
                                              help="Train on a slice (smoke runs only).")] = None,
    out: Annotated[Path | None, typer.Option(envvar="EDGEFED_BENCH_OUT",
                                             help="JSON result; default bench-results/cascade-<task>.json.")] = None,
) -> None:
    """P2: accuracy vs escalation rate per policy, cloud-parity rates, budget policy realised rates."""
    if budget_score not in ("confidence", "margin", "entropy"):
        raise typer.BadParameter(f"{budget_score!r} is not a score; use confidence, margin or entropy",
                                 param_hint="--budget-score")
    from shared.bench.cascade import run_p2

    out = out or _OUT / f"cascade-{task}.json"
    m, data = _models(models, task, signing_key, limit)
    _finish(run_p2(m, data, budget_score=budget_score, plot_path=out.with_suffix(".png")), out)


@bench_app.command()
def transport(
    requests: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_REQUESTS", min=5,
                                          help="Timed round trips per payload size.")] = 300,
    warmup: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_WARMUP", min=0, help="Untimed first round trips.")]
    = 30,
    out: Annotated[Path, typer.Option(envvar="EDGEFED_BENCH_OUT", help="JSON result.")]
    = _OUT / "transport.json",
) -> None:
    """P3: escalation round-trip overhead through the real hub vs a raw MQTT echo, 1/30/150 KB."""
    from shared.bench.transport import run_p3

    _finish(run_p3(requests=requests, warmup=warmup), out)
