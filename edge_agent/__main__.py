"""``python -m edge_agent run ...``: the agent's CLI without the rest of ``edgefed`` (edge-only installs)."""

import logging

from edge_agent.cli import agent_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
agent_app(prog_name="edgefed-agent")
