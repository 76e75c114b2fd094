"""``edgefed bench``: benchmarks measured against the product targets (PRODUCT.md, P1-P3, P7, P8).

One module per benchmark (``edge`` P1, ``footprint`` P7, ``swap`` P8, ``cascade`` P2, ``transport``
P3); ``common`` holds the result format, ``models``/``stack``/``agentload`` what they run on.
Nothing is imported here: ``edgefed`` imports ``shared.bench.cli`` at start-up, and torch,
onnxruntime and the rest load only inside a command.
"""

__all__: list[str] = []
