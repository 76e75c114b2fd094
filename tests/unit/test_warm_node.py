"""federation.warm_node's seams into the pinned Flower: if Flower moves them, these fail (not the rounds)."""

from __future__ import annotations

import inspect
import time

import pytest

from federation import warm_node


def test_capped_sleep_caps_the_poll_and_the_reply_wait() -> None:
    capped = warm_node.CappedSleep(0.05, short_cap=0.01)
    t0 = time.monotonic()
    capped.sleep(3)  # the poll between empty pulls
    capped.sleep(0.5)  # the local wait for a reply
    assert time.monotonic() - t0 < 1.0
    assert capped.monotonic is time.monotonic and capped.time is time.time
    for bad in (0.0, -1.0, 3.5):
        with pytest.raises(ValueError, match="outside"):
            warm_node.CappedSleep(bad)


def test_task_wake_sleeps_until_a_byte_per_task_then_falls_back_when_the_writer_is_gone() -> None:
    import os

    r, w = os.pipe()
    try:
        wake = warm_node.TaskWake(r, max_idle_s=0.3)
        t0 = time.monotonic()
        wake.sleep(0.2)  # nothing written: waits max_idle_s
        assert 0.25 <= time.monotonic() - t0 < 2.0
        os.write(w, b"tt")  # two tasks: two wake-ups at once
        t0 = time.monotonic()
        wake.sleep(5)
        wake.sleep(5)
        assert time.monotonic() - t0 < 0.2
        os.close(w)
        w = -1
        wake.sleep(5)  # end of file
        t0 = time.monotonic()
        wake.sleep(0.05)  # now a plain sleep of what it is asked
        assert time.monotonic() - t0 < 0.2
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_notify_tasks_writes_a_byte_per_stored_message() -> None:
    import os

    import flwr.supernode.start_client_internal as loop

    before = loop._pull_and_store_message
    r, w = os.pipe()
    try:
        assert "run_id = _pull_and_store_message(" in inspect.getsource(loop)  # called through the module
        results = iter([7, None, 8])
        loop._pull_and_store_message = lambda *a, **k: next(results)
        warm_node.notify_tasks(w)
        assert [loop._pull_and_store_message() for _ in range(3)] == [7, None, 8]
        os.set_blocking(r, False)
        assert os.read(r, 10) == b"tt"
    finally:
        loop._pull_and_store_message = before
        os.close(r)
        os.close(w)


def test_supernode_loop_sleeps_through_the_time_module_and_is_capped() -> None:
    import flwr.supernode.start_client_internal as loop

    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source  # the polls this module caps
    before = loop.time
    try:
        warm_node.cap_supernode_polls(0.1)
        assert isinstance(loop.time, warm_node.CappedSleep) and loop.time.cap == 0.1
        warm_node.cap_supernode_polls(0.2)  # again (a restart in the same process) is fine
        assert loop.time.cap == 0.2
    finally:
        loop.time = before


def test_superexec_builds_its_executor_through_get_executor_and_sleeps_through_time() -> None:
    import flwr.supercore.superexec.run_superexec as superexec

    assert callable(superexec.get_executor) and superexec.time is time
    source = inspect.getsource(superexec.run_superexec)
    assert "get_executor(" in source and "time.sleep(task_poll_interval)" in source


def test_run_clientapp_and_execution_spec_have_what_the_child_passes() -> None:
    from flwr.supercore.superexec.executor.types import ExecutionSpec
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    params = set(inspect.signature(run_clientapp).parameters)
    assert {"runtime_api_address", "token", "insecure", "certificates", "parent_pid",
            "runtime_dependency_install"} <= params
    fields = set(ExecutionSpec.__dataclass_fields__)
    assert {"task_type", "runtime_api_address", "token", "insecure", "root_certificates_path", "parent_pid",
            "runtime_dependency_install", "task_id"} <= fields


def test_warm_argv_and_bad_arguments() -> None:
    argv = warm_node.warm_supernode_argv(["--superlink", "127.0.0.1:1"], 0.3)
    assert argv[1:5] == ["-m", "federation.warm_node", "--poll-s", "0.3"] and argv[-3:] == ["--", "--superlink",
                                                                                            "127.0.0.1:1"]
    with pytest.raises(SystemExit):
        warm_node.main(["--poll-s", "9", "--", "--superlink", "x:1"])
    with pytest.raises(SystemExit, match="subprocess"):
        warm_node.main(["--", "--isolation", "subprocess"])


def test_the_clientapp_runtime_pulls_through_a_module_attribute_whose_backoff_we_shorten() -> None:
    import flwr.supernode.runtime.run_clientapp as runtime

    assert "pull_and_inflate_object_from_tree(" in inspect.getsource(runtime.pull_task_input)
    before = runtime.pull_and_inflate_object_from_tree
    try:
        warm_node.shorten_pull_backoff(0.05, 1.0)
        warm_node.shorten_pull_backoff(0.05, 1.0)  # idempotent: wraps Flower's function once
        patched = runtime.pull_and_inflate_object_from_tree
        assert patched.func is before and patched.keywords == {"initial_backoff": 0.05, "backoff_cap": 1.0}
        assert {"initial_backoff", "backoff_cap"} <= set(inspect.signature(before).parameters)
    finally:
        runtime.pull_and_inflate_object_from_tree = before
