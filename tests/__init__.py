import pytest

# Fixture modules that test files also import helpers from: register them before that first import so
# pytest can still rewrite their asserts (otherwise it warns "Module already imported").
pytest.register_assert_rewrite("tests.agent_fixtures")
pytest.register_assert_rewrite("tests.hub_fixtures")
