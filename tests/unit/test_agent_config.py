"""AgentSettings validation and the CLI's refusal of bad settings (exit 2, one `error:` line)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_agent.cli import agent_app
from edge_agent.config import AgentSettings, SettingsError, build_settings

BASE = dict(hub_url="http://127.0.0.1:8080/", broker_url="mqtt://127.0.0.1:1883", device_id="cam-1", region="r1")


def test_defaults_and_derived_paths() -> None:
    s = build_settings(**BASE)
    assert isinstance(s, AgentSettings)
    assert s.hub_url == "http://127.0.0.1:8080"
    assert s.root == Path(".edgefed/agent-cam-1")
    assert s.bundles_dir == Path(".edgefed/agent-cam-1/bundles")
    assert s.pinned_keys_path == Path(".edgefed/agent-cam-1/trusted_keys.pem")
    assert (s.threshold, s.policy, s.escalation_timeout_s, s.port) == (0.8, "threshold", 1.0, 8090)
    assert "tok" not in repr(build_settings(**BASE, token="tok"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("device_id", "cam/1", r"device_id: device id 'cam/1' is invalid"),
        ("device_id", "+", r"device_id: device id '\+' is invalid"),
        ("broker_url", "tcp://h:1", r"broker_url: broker URL 'tcp://h:1' is invalid"),
        ("hub_url", "127.0.0.1:8080", r"hub_url: hub URL '127.0.0.1:8080' is invalid"),
        ("threshold", 1.5, r"threshold: threshold 1.5 is outside \[0, 1\]"),
        ("policy", "sometimes", r"policy: unknown escalation policy 'sometimes'"),
        ("escalation_timeout_s", 0, r"escalation_timeout_s: .*greater than 0"),
        ("port", 70000, r"port: "),
    ],
)
def test_invalid_settings_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        build_settings(**{**BASE, field: value})


def _run(*args: str, env: dict[str, str] | None = None):  # noqa: ANN202
    return CliRunner().invoke(agent_app, ["run", *args], env=env)


def test_cli_refuses_an_invalid_device_id_with_exit_2() -> None:
    r = _run("--hub", "http://h:1", "--broker", "mqtt://h:1", "--device-id", "a b", "--region", "r")
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        "error: device_id: device id 'a b' is invalid: use 1-128 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    ]


def test_cli_refuses_an_invalid_broker_url_from_the_environment() -> None:
    env = {
        "EDGEFED_HUB_URL": "http://h:1",
        "EDGEFED_BROKER_URL": "http://h:1883",
        "EDGEFED_DEVICE_ID": "cam-1",
        "EDGEFED_REGION": "r",
    }
    r = _run(env=env)
    assert r.exit_code == 2
    assert r.output.startswith("error: broker_url: broker URL 'http://h:1883' is invalid")


def test_every_option_has_an_envvar_and_help() -> None:
    import typer.main

    command = typer.main.get_command(agent_app).commands["run"]  # type: ignore[attr-defined]
    options = [p for p in command.params if p.param_type_name == "option"]
    assert len(options) >= 14
    for p in options:
        assert p.envvar and str(p.envvar).startswith("EDGEFED_"), p.name
        assert p.help, p.name


def test_new_settings_reach_the_policy_and_the_redactor() -> None:
    s = build_settings(
        **BASE, policy="budget", budget_rate=0.15, budget_score="margin", redact="operator:hash,serial:mask"
    )
    cfg = s.policy_config
    assert (cfg.name, cfg.budget_rate, cfg.budget_score) == ("budget", 0.15, "margin")
    assert [(r.field, r.action) for r in s.redact] == [("operator", "hash"), ("serial", "mask")]
    assert s.learning_path.name == "learning.sqlite3" and s.breaker_failures == 5
    assert "salt-value" not in repr(build_settings(**BASE, redact_salt="salt-value"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDGEFED_REDACT": "operator:shred"}, "error: redact: redaction rule 'operator:shred': unknown action"),
        ({"EDGEFED_POLICY": "budget", "EDGEFED_BUDGET": "1.5"}, "error: budget_rate: "),
        ({"EDGEFED_BUDGET_SCORE": "loss"}, "error: budget_score: "),
        ({"EDGEFED_BREAKER_COOLDOWN": "0"}, "error: breaker_cooldown_s: "),
    ],
)
def test_cli_refuses_bad_new_settings_from_the_environment(env: dict[str, str], message: str) -> None:
    base = {
        "EDGEFED_HUB_URL": "http://h:1",
        "EDGEFED_BROKER_URL": "mqtt://h:1",
        "EDGEFED_DEVICE_ID": "c",
        "EDGEFED_REGION": "r",
    }
    r = _run(env={**base, **env})
    assert r.exit_code == 2, r.output
    assert r.output.startswith(message), r.output
