"""``edgefed bench edge | cascade | transport | hub``: benchmarks that each write a JSON result and print
target vs measured. Only typer and the standard library at import time; everything heavy loads
inside the command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

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
    edge_venv: Annotated[Path | None, typer.Option(
        envvar="EDGEFED_BENCH_EDGE_VENV",
        help="P7: build the edge-only venv here and keep it; later runs reinstall only the project into it.")]
    = None,
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
                       clients=clients, edge_venv=edge_venv), out_dir / f"edge-p7-{task}.json")
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
    cloud_arch: Annotated[str, typer.Option(envvar="EDGEFED_BENCH_CLOUD_ARCH",
                                            help="Random-weight network the hub answers with (width 8): "
                                                 "edge-cnn (light) or cloud-resnet (heavier at 150 KB).")]
    = "edge-cnn",
) -> None:
    """P3: escalation round-trip overhead through the real hub vs a raw MQTT echo, 1/30/150 KB."""
    from shared.bench.transport import run_p3
    from shared.models import ARCHITECTURES

    if cloud_arch not in ARCHITECTURES:
        raise typer.BadParameter(f"unknown architecture {cloud_arch!r}; known: {', '.join(sorted(ARCHITECTURES))}",
                                 param_hint="--cloud-arch")
    _finish(run_p3(requests=requests, warmup=warmup, cloud_arch=cloud_arch), out)


@bench_app.command()
def hub(
    sections: Annotated[str, typer.Option(envvar="EDGEFED_BENCH_SECTIONS",
                                          help="Comma-separated: p4 (dynamic batching), p5 (load on one hub).")]
    = "p4,p5",
    device: Annotated[str, typer.Option(envvar="EDGEFED_BENCH_DEVICE",
                                        help="P4: auto (cuda when present), cpu or cuda.")] = "auto",
    concurrency: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_CONCURRENCY", min=1,
                                             help="P4: concurrent closed-loop submitters.")] = 64,
    duration: Annotated[float, typer.Option(envvar="EDGEFED_BENCH_DURATION", min=0.1,
                                            help="P4: timed seconds per configuration and client kind.")] = 5.0,
    warmup: Annotated[float, typer.Option(envvar="EDGEFED_BENCH_WARMUP_S", min=0.0,
                                          help="P4: untimed seconds before each timed window.")] = 1.0,
    max_batch_size: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_MAX_BATCH_SIZE", min=1,
                                                help="P4: max_batch_size of the batched run.")] = 64,
    max_queue_delay_ms: Annotated[float, typer.Option(envvar="EDGEFED_BENCH_MAX_QUEUE_DELAY_MS", min=0.0,
                                                      help="P4: max_queue_delay_ms of the batched run.")] = 2.0,
    checkpoint: Annotated[Path | None, typer.Option(envvar="EDGEFED_BENCH_CHECKPOINT",
                                                    help="P4: trained cloud checkpoint; default random weights "
                                                         "of the factory's ELPV cloud network.")] = None,
    agents: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_AGENTS", min=1,
                                        help="P5: connected agents.")] = 1000,
    rate: Annotated[float, typer.Option(envvar="EDGEFED_BENCH_RATE", min=1.0,
                                        help="P5: escalations per second offered.")] = 1000.0,
    p5_duration: Annotated[float, typer.Option(envvar="EDGEFED_BENCH_P5_DURATION", min=1.0,
                                               help="P5: seconds of offered load.")] = 20.0,
    out_dir: Annotated[Path, typer.Option(envvar="EDGEFED_BENCH_OUT_DIR", help="Where results go.")] = _OUT,
) -> None:
    """P4 hub throughput with dynamic batching vs one at a time; P5 one hub under many agents."""
    wanted = {s.strip().lower() for s in sections.split(",") if s.strip()}
    unknown = wanted - {"p4", "p5"}
    if unknown or not wanted:
        raise typer.BadParameter(f"unknown section(s) {', '.join(sorted(unknown)) or '(none given)'}; use p4, p5",
                                 param_hint="--sections")
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"{device!r} is not a device; use auto, cpu or cuda", param_hint="--device")
    if "p4" in wanted:
        from shared.bench.hub_batching import P4Config, run_p4

        cfg = P4Config(device=device, concurrency=concurrency, duration_s=duration, warmup_s=warmup,
                       max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms, checkpoint=checkpoint)
        try:
            result = run_p4(cfg)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        _finish(result, out_dir / "hub-p4.json")
    if "p5" in wanted:
        from shared.bench.hub_load import run_p5

        _finish(run_p5(agents=agents, rate=rate, duration_s=p5_duration), out_dir / "hub-p5.json")


def _strategy_params(items: list[str], strategies: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``STRATEGY.KEY=VALUE`` items as {strategy: {key: value}}; values are JSON where they parse
    (numbers, booleans), else strings. A strategy must be one of those run."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, raw = item.partition("=")
        name, dot, key = target.partition(".")
        name = name.strip().lower()
        if not sep or not dot or not name or not key:
            raise typer.BadParameter(f"{item!r}: expected STRATEGY.KEY=VALUE, e.g. fedadam.eta=0.001",
                                     param_hint="--strategy-param")
        if name not in strategies:
            raise typer.BadParameter(f"{item!r}: {name!r} is not among the strategies run "
                                     f"({', '.join(strategies)})", param_hint="--strategy-param")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[key.strip()] = value
    return out


@bench_app.command()
def fed(
    sections: Annotated[str, typer.Option(envvar="EDGEFED_BENCH_SECTIONS",
                                          help="Comma-separated: p6 (federated vs centralized, Fashion-MNIST), "
                                               "p9 (the loop on ELPV: escalations before/after one round).")]
    = "p6",
    rounds: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_ROUNDS", min=1, help="P6: federated rounds.")] = 20,
    limit: Annotated[int | None, typer.Option(envvar="EDGEFED_BENCH_LIMIT", min=100,
                                              help="P6: use a stratified slice of Fashion-MNIST (smoke runs only).")]
    = None,
    strategies: Annotated[str, typer.Option(envvar="EDGEFED_BENCH_STRATEGIES",
                                            help="P6: comma-separated Flower strategies.")] = "fedavg,fedprox,fedadam",
    regions: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_REGIONS", min=2,
                                         help="P6: regions (one SuperNode each).")] = 10,
    alpha: Annotated[float, typer.Option(envvar="EDGEFED_BENCH_ALPHA", min=0.001,
                                         help="P6: Dirichlet label-skew concentration.")] = 0.3,
    local_epochs: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_LOCAL_EPOCHS", min=1,
                                              help="P6: local epochs per round.")] = 1,
    lr: Annotated[float, typer.Option(envvar="EDGEFED_BENCH_LR", min=1e-6, help="P6: learning rate (Adam).")] = 1e-3,
    client_eval: Annotated[bool, typer.Option(envvar="EDGEFED_BENCH_CLIENT_EVAL",
                                              help="P6: also let regions evaluate each round.")] = False,
    task_poll_s: Annotated[float | None, typer.Option(envvar="EDGEFED_BENCH_TASK_POLL_S", min=0.01, max=60.0,
                                                      help="P6: SuperExec task poll (default 0.2 s; Flower's "
                                                           "own default 1 s).")] = None,
    reply_poll_s: Annotated[float | None, typer.Option(envvar="EDGEFED_BENCH_REPLY_POLL_S", min=0.01, max=10.0,
                                                       help="P6: ServerApp reply poll (default 0.2 s; Flower's "
                                                            "own loop 3 s).")] = None,
    strategy_param: Annotated[list[str] | None, typer.Option(
        "--strategy-param", envvar="EDGEFED_BENCH_STRATEGY_PARAMS", show_default=False,
        help="P6: STRATEGY.KEY=VALUE (repeatable), e.g. fedadam.eta=0.001; defaults: fedprox.proximal_mu=0.01, "
             "fedadam.eta=0.01, fedadam.eta_l=LR.")] = None,
    trainer: Annotated[bool, typer.Option(envvar="EDGEFED_BENCH_TRAINER",
                                          help="P6: a long-lived trainer process per SuperNode (--no-trainer: "
                                               "train inside each ClientApp process).")] = True,
    models: Annotated[Path | None, typer.Option(
        envvar="EDGEFED_BENCH_P9_MODELS",
        help="P9: reference models directory (cloud.pt, edge.pt, bundle/, signing.key; trained there if absent or "
             "made with other settings); default bench-results/models/elpv.")] = None,
    p9_rounds: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_P9_ROUNDS", min=1,
                                           help="P9: federated rounds on the regions' hard cases.")] = 1,
    p9_local_epochs: Annotated[int, typer.Option(envvar="EDGEFED_BENCH_P9_LOCAL_EPOCHS", min=1,
                                                 help="P9: local epochs per round.")] = 6,
    p9_lr: Annotated[float, typer.Option(envvar="EDGEFED_BENCH_P9_LR", min=1e-7,
                                         help="P9: learning rate (Adam).")] = 3e-4,
    p9_feedback: Annotated[float, typer.Option(envvar="EDGEFED_BENCH_P9_FEEDBACK", min=0.0, max=1.0,
                                               help="P9: share of escalated phase-A cases inspectors label.")] = 0.5,
    out_dir: Annotated[Path, typer.Option(envvar="EDGEFED_BENCH_OUT_DIR", help="Where results go.")] = _OUT,
) -> None:
    """P6: FedAvg/FedProx/FedAdam on SuperLink + SuperNodes vs centralized training (JSON + PNG); P9: the loop."""
    wanted = {s.strip().lower() for s in sections.split(",") if s.strip()}
    unknown = wanted - {"p6", "p9"}
    if unknown or not wanted:
        raise typer.BadParameter(f"unknown section(s) {', '.join(sorted(unknown)) or '(none given)'}; use p6, p9",
                                 param_hint="--sections")
    names = tuple(s.strip().lower() for s in strategies.split(",") if s.strip())
    from federation.strategies import STRATEGIES

    bad = [s for s in names if s not in STRATEGIES]
    if bad or not names:
        raise typer.BadParameter(f"unknown strateg(ies) {', '.join(bad) or '(none given)'}; use "
                                 f"{', '.join(STRATEGIES)}", param_hint="--strategies")
    per_strategy = _strategy_params(strategy_param or [], names)
    if "p6" in wanted:
        from shared.bench.fed import run_p6

        out = out_dir / "fed-p6.json"
        _finish(run_p6(rounds=rounds, limit=limit, strategies=names, regions=regions, alpha=alpha,
                       local_epochs=local_epochs, lr=lr, client_eval=client_eval, plot_path=out.with_suffix(".png"),
                       task_poll_s=task_poll_s, reply_poll_s=reply_poll_s, trainers=trainer,
                       strategy_params=per_strategy),
                out)
    if "p9" in wanted:
        from shared.bench.loop import run_p9

        p9_strategy = names[0] if len(names) == 1 else "fedavg"
        _finish(run_p9(out_dir / "p9-work", models_dir=models or _OUT / "models" / "elpv", rounds=p9_rounds,
                       local_epochs=p9_local_epochs, lr=p9_lr, strategy=p9_strategy, feedback_share=p9_feedback),
                out_dir / "fed-p9.json")
