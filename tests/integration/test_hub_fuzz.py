"""Schema-driven fuzzing of the hub's REST API (schemathesis, from the hub's own OpenAPI document).

Every operation the running hub documents is called with generated valid and invalid input, with
the admin token so mutating calls get past authentication, and must never answer 5xx; responses
that the schema describes must match it. New routes are covered as soon as they are in /openapi.json.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance
from schemathesis.core.failures import FailureGroup
from schemathesis.schemas import APIOperation

from shared.broker import DevBroker
from tests.hub_fixtures import HubModels, HubProcess, start_hub_with_models

pytest_plugins = ["tests.hub_fixtures"]
pytestmark = pytest.mark.integration

# Per operation and mode: keeps the run near 30 s on a 2-core machine; raise it for a deeper run.
EXAMPLES = int(os.environ.get("EDGEFED_TEST_FUZZ_EXAMPLES", "3"))


@pytest.fixture(scope="module")
def fuzz_hub(
    session_broker: DevBroker, hub_models: HubModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HubProcess]:
    """A hub of its own: fuzzing registers devices, tokens and more that no other test should see."""
    proc = start_hub_with_models(tmp_path_factory.mktemp("fuzz-hub") / "hub", session_broker.url, hub_models)
    try:
        yield proc
    finally:
        proc.stop()


def _fuzz_operation(operation: APIOperation, mode: GenerationMode, hub: HubProcess, examples: int) -> list[str]:
    """Run ``examples`` generated cases of one operation; return what failed, one line each."""
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              phases=[Phase.explicit, Phase.generate])
    def run(case: schemathesis.Case) -> None:
        try:
            case.call_and_validate(
                base_url=hub.base_url, headers=headers, timeout=30,
                checks=[not_a_server_error, response_schema_conformance],
            )
        except (AssertionError, FailureGroup) as exc:  # how schemathesis reports failed checks
            failures.append(f"{operation.label} ({mode.value}): {exc}")

    try:
        run()
    except Unsatisfiable:  # no invalid input exists for an operation without parameters or body
        assert mode is GenerationMode.NEGATIVE, operation.label
    return failures


def test_no_server_errors_and_documented_responses_match(fuzz_hub: HubProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_hub.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failures += _fuzz_operation(operation, mode, fuzz_hub, EXAMPLES)
    assert not failures, f"{len(failures)} failing operations:\n" + "\n\n".join(failures)


def test_fuzzing_left_the_hub_serving(fuzz_hub: HubProcess, tmp_path: Path) -> None:
    assert httpx.get(f"{fuzz_hub.base_url}/readyz", timeout=10).status_code == 200
    with fuzz_hub.client() as client:
        assert any(m.name == "t-cloud" for m in client.list_models().data)
