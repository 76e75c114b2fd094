"""``python -m cloud_hub serve ...``: the hub's commands without the rest of the ``edgefed`` CLI."""

from cloud_hub.cli import hub_app

hub_app(prog_name="python -m cloud_hub")
