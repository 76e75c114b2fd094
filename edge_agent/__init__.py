"""The edge agent: onnxruntime inference, escalation over MQTT, local HTTP API.

Deliberately re-exports nothing: ``edge_agent.cli`` must import without onnxruntime or starlette.
"""
