"""The edge agent must run on an edge-only install: importing it must not import torch."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import edge_agent

# Every module of the package (found, not listed, so a new module cannot slip past), and what it needs.
AGENT_MODULES = [
    *(f"edge_agent.{m.name}" for m in pkgutil.iter_modules(edge_agent.__path__) if m.name != "__main__"),
    "shared.data.preprocess",
    # The root CLI assembles every part's commands; `edgefed agent run` goes through it.
    "shared.cli",
]


def test_every_module_is_checked() -> None:
    assert {"edge_agent.policy", "edge_agent.budget", "edge_agent.metrics", "edge_agent.telemetry"} <= set(
        AGENT_MODULES
    )


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_agent_imports_no_torch() -> None:
    modules = AGENT_MODULES
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + (
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
            "assert not heavy, heavy\n"
        )
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr


def test_agent_imports_with_torch_unavailable() -> None:
    # sys.modules[name] = None makes any `import torch` raise ImportError, as on an edge-only install.
    modules = AGENT_MODULES
    r = _run("import sys\nsys.modules['torch'] = None\n" + "".join(f"import {m}\n" for m in modules))
    assert r.returncode == 0, r.stderr


def test_cli_module_imports_nothing_heavy() -> None:
    r = _run(
        "import sys\nimport edge_agent.cli\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'onnxruntime', 'fastapi', 'uvicorn', 'sqlalchemy', 'numpy'))\n"
        "assert not heavy, heavy\n"
    )
    assert r.returncode == 0, r.stderr


def test_agent_command_help_runs_without_torch() -> None:
    r = _run(
        "import sys\nsys.modules['torch'] = None\nsys.argv = ['edgefed', 'agent', 'run', '--help']\n"
        "from shared.cli import main\nmain()\n"
    )
    assert r.returncode == 0, r.stderr
    assert "--device-id" in r.stdout


def test_serving_process_leaves_rare_path_libraries_unloaded() -> None:
    # Resident memory (P7): the agent verifies bundles with the OpenSSL CPython already loaded, not with
    # `cryptography` (~7.5 MiB); Pillow loads only when the first PNG/JPEG arrives (~2 MiB); tqdm only
    # for `agent infer`; the local API is Starlette, never FastAPI (~11 MiB). Importing the whole serving
    # chain must load none of them.
    r = _run(
        "import sys\n"
        + "".join(f"import {m}\n" for m in AGENT_MODULES)
        + "lazy = sorted(m for m in sys.modules if m.split('.')[0] in ('cryptography', 'PIL', 'tqdm', 'fastapi'))\n"
        "assert not lazy, lazy\n"
    )
    assert r.returncode == 0, r.stderr


def test_bundle_verification_and_image_decoding_still_work_after_lazy_imports(tmp_path) -> None:  # noqa: ANN001
    # The same process verifies a signed bundle (OpenSSL, still no cryptography) and decodes a PNG (Pillow now).
    from shared.bundle import generate_keypair, public_key_pem

    key = generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    assert public_key_pem(key.public_key()) == (tmp_path / "k.pub").read_bytes()
    code = f"""
import sys
from shared.bundle import Manifest, InputSpec, canonical_bytes, load_verify_key, verify_manifest
from shared.bundle.ed25519 import openssl_available
from shared.data.preprocess import decode_image
pub = load_verify_key(open({str(tmp_path / "k.pub")!r}, "rb").read())
m = Manifest.model_validate_json(sys.stdin.read())
assert verify_manifest(m, [pub]) is pub
assert openssl_available() and not any(k.startswith("cryptography") for k in sys.modules)
img = decode_image(open({str(tmp_path / "x.png")!r}, "rb").read(), InputSpec(shape=[1, 1, 4, 4]))
assert img.shape == (4, 4) and int(img[0, 0]) == 7 and "PIL" in sys.modules
"""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(buf, format="PNG")
    (tmp_path / "x.png").write_bytes(buf.getvalue())
    from shared.bundle import InputSpec, Manifest, sign_manifest

    manifest = sign_manifest(Manifest(name="m", version="1", task="t", created_at="2026-01-01T00:00:00Z",
                                      input=InputSpec(shape=[1, 1, 4, 4]), labels=["a", "b"],
                                      model_sha256="0" * 64, model_size_bytes=0), key)
    r = subprocess.run([sys.executable, "-c", code], input=manifest.model_dump_json(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
