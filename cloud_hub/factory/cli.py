"""``edgefed model train`` and ``edgefed model compress``.

Only typer and the standard library at import time: torch and onnxruntime load inside the commands,
because ``shared.cli`` imports this module in every ``edgefed`` process, the edge agent's included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["train", "compress"]

CacheDir = Annotated[
    Path | None,
    typer.Option(
        envvar="EDGEFED_CACHE_DIR",
        help="Where resized datasets are cached; default ~/.cache/edgefed.",
        show_default=False,
    ),
]
Limit = Annotated[
    int | None,
    typer.Option(
        envvar="EDGEFED_LIMIT",
        help="Use a deterministic stratified slice of this many items (quick runs, tests).",
        show_default=False,
    ),
]
Seed = Annotated[int, typer.Option(envvar="EDGEFED_SEED", help="Seed of the train/calibration/test split.")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def train(
    task: Annotated[str, typer.Option(envvar="EDGEFED_TASK", help="Task: elpv, elpv4 or fmnist.")] = "elpv",
    out: Annotated[
        Path, typer.Option(envvar="EDGEFED_MODELS_DIR", help="Directory for cloud.pt, edge.pt and metrics.")
    ] = Path("models"),
    epochs: Annotated[
        int | None,
        typer.Option(
            envvar="EDGEFED_EPOCHS",
            help="Epochs of each model; default per task (ELPV 18, Fashion-MNIST 6).",
            show_default=False,
        ),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(
            envvar="EDGEFED_RESOLUTION",
            help="Square input size; default per task (ELPV 64, Fashion-MNIST 28).",
            show_default=False,
        ),
    ] = None,
    limit: Limit = None,
    seed: Seed = 0,
    version: Annotated[str, typer.Option(envvar="EDGEFED_MODEL_VERSION", help="Version of both checkpoints.")] = "1",
    cache_dir: CacheDir = None,
    cloud_width: Annotated[
        int, typer.Option(envvar="EDGEFED_CLOUD_WIDTH", help="Channel width of the cloud ResNet.")
    ] = 16,
    edge_width: Annotated[
        int,
        typer.Option(
            envvar="EDGEFED_EDGE_WIDTH",
            help="Channel width of the edge CNN. At 16 the network is so small (0.25 ms) that INT8 saves "
            "no time; at 32 INT8 runs in ~0.5x the FP32 time on a CPU with VNNI.",
        ),
    ] = 32,
    progress: Annotated[bool, typer.Option(envvar="EDGEFED_PROGRESS", help="Show a progress bar per epoch.")] = True,
) -> None:
    """Train the cloud model, then the edge model distilled from it, on the task's train split."""
    from cloud_hub.factory.train import TrainConfig, train_models
    from shared.data import PartitionError, UnknownTaskError

    try:
        result = train_models(
            task,
            out,
            epochs,
            resolution,
            limit,
            seed,
            progress,
            version=version,
            cache_dir=cache_dir,
            config=TrainConfig(cloud_width=cloud_width, edge_width=edge_width),
        )
    except (UnknownTaskError, PartitionError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    m = result.metrics
    typer.echo(
        f"task {task} at {m['resolution'][0]}x{m['resolution'][1]}, test split {m['sizes']['test']} items "
        f"(majority baseline {m['majority_baseline']:.3f})"
    )
    for role in ("cloud", "edge"):
        r = m[role]
        typer.echo(
            f"  {role:5s} {r['arch']:13s} accuracy {r['test_accuracy']:.4f} "
            f"(balanced {r['test_balanced_accuracy']:.4f}), {r['epochs']} epochs, {r['train_seconds']:.0f} s"
        )
    typer.echo(f"wrote {result.cloud_path}, {result.edge_path}, {result.metrics_path} in {m['total_seconds']:.0f} s")


def compress(
    signing_key: Annotated[
        Path,
        typer.Option(
            envvar="EDGEFED_SIGNING_KEY",
            help="Ed25519 private key (PEM); if absent, a new pair is created there (public half: suffix .pub).",
        ),
    ],
    checkpoint: Annotated[
        Path, typer.Option(envvar="EDGEFED_CHECKPOINT", help="Edge model checkpoint (.pt) to compress.")
    ] = Path("models/edge.pt"),
    out: Annotated[
        Path, typer.Option(envvar="EDGEFED_BUNDLE_DIR", help="Bundle directory to create (must not hold files).")
    ] = Path("models/bundle"),
    name: Annotated[
        str | None,
        typer.Option(envvar="EDGEFED_MODEL_NAME", help="Bundle name; default <task>-edge.", show_default=False),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFED_MODEL_VERSION", help="Bundle version; default the checkpoint's.", show_default=False
        ),
    ] = None,
    parent_version: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFED_PARENT_VERSION",
            help="Version this one derives from; default the checkpoint's parent.",
            show_default=False,
        ),
    ] = None,
    max_drop: Annotated[
        float,
        typer.Option(
            envvar="EDGEFED_MAX_DROP",
            help="Gate: largest allowed accuracy drop FP32 -> INT8, in percentage points.",
        ),
    ] = 1.0,
    quant_format: Annotated[
        str,
        typer.Option(
            envvar="EDGEFED_QUANT_FORMAT",
            help="INT8 file format: QOperator (integer operators, smaller file) or QDQ (Q/DQ pairs that "
            "onnxruntime fuses into the same kernels at load).",
        ),
    ] = "QOperator",
    limit: Limit = None,
    seed: Seed = 0,
    cache_dir: CacheDir = None,
) -> None:
    """Export the edge model to ONNX, quantize it to INT8, gate on accuracy, write a signed bundle."""
    from cloud_hub.factory.compress import CompressionError, compress_checkpoint
    from cloud_hub.factory.quantize import QUANT_FORMATS
    from shared.bundle import BundleError, SignatureError
    from shared.models import CheckpointError

    if not checkpoint.is_file():
        raise _fail(f"checkpoint {checkpoint} does not exist; train one with `edgefed model train`")
    if quant_format not in QUANT_FORMATS:
        raise _fail(f"--quant-format {quant_format!r} is not one of {', '.join(QUANT_FORMATS)}")
    try:
        bundle = compress_checkpoint(
            checkpoint,
            out,
            signing_key,
            name=name,
            version=version,
            parent_version=parent_version,
            max_drop_pt=max_drop,
            quant_format=quant_format,  # type: ignore[arg-type]  # checked against QUANT_FORMATS above
            limit=limit,
            seed=seed,
            cache_dir=cache_dir,
        )
    except (CompressionError, CheckpointError, SignatureError, BundleError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    man = bundle.manifest
    m = man.metrics
    typer.echo(f"bundle {man.name}:{man.version} -> {bundle.path}")
    typer.echo(f"  {'':12s} {'FP32':>10s} {'INT8':>10s} {'ratio':>7s}")
    typer.echo(
        f"  {'accuracy':12s} {m.fp32_accuracy:10.4f} {m.int8_accuracy:10.4f} "
        f"{'':>7s}  drop {m.accuracy_drop_pt:.2f} pt (gate {max_drop:g})"
    )
    size32, size8 = m.fp32_size_bytes or 0, m.int8_size_bytes or 0
    lat32, lat8 = m.fp32_latency_ms or 0.0, m.int8_latency_ms or 0.0
    typer.echo(f"  {'size bytes':12s} {size32:10d} {size8:10d} {size8 / max(size32, 1):7.3f}")
    typer.echo(f"  {'latency ms':12s} {lat32:10.3f} {lat8:10.3f} {lat8 / max(lat32, 1e-9):7.3f}")
    typer.echo(f"  holdout {m.holdout_size} items; signed with key id {man.key_id}")
