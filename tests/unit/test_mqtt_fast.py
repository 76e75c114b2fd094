"""shared.mqtt's paho fast paths: buffered reads, merged writes, wake-ups only from other threads.

These override private methods of paho-mqtt 2.2 (pinned); the first test fails loudly if an upgrade
renames them. The rest run on a real mosquitto and check that nothing is lost or reordered.
"""

from __future__ import annotations

import socket
import threading
import time

import paho.mqtt.client as paho

from shared.broker import DevBroker
from shared.mqtt import Message, MqttClient, _BufferedSocket, _FastPahoClient


def test_paho_private_names_we_override_still_exist() -> None:
    for name in ("_create_socket", "_packet_queue", "loop_write", "_packet_write", "_loop"):
        assert callable(getattr(paho.Client, name, None)), f"paho.Client.{name} is gone: shared.mqtt needs a look"
    c = _FastPahoClient(paho.CallbackAPIVersion.VERSION2, client_id="probe", protocol=paho.MQTTv5)
    for attr in ("_out_packet", "_sockpairW", "_thread", "_transport"):
        assert hasattr(c, attr), f"paho.Client lost {attr}"


def test_buffered_socket_serves_small_reads_from_one_large_read() -> None:
    a, b = socket.socketpair()
    try:
        wrapped = _BufferedSocket(a)
        b.sendall(b"\x30\x03abc\x40\x02\x00\x01")
        time.sleep(0.05)
        assert wrapped.recv(1) == b"\x30"
        assert wrapped.pending() == 8  # the rest is buffered: paho must not wait in select for it
        assert wrapped.recv(1) == b"\x03"
        assert wrapped.recv(3) == b"abc"
        assert wrapped.recv(100) == b"\x40\x02\x00\x01"  # never more than asked, never past the buffer
        assert wrapped.pending() == 0
        a.setblocking(False)
        try:
            wrapped.recv(1)
            raise AssertionError("an empty non-blocking socket must raise BlockingIOError")
        except BlockingIOError:
            pass
        assert wrapped.fileno() == a.fileno()
        b.close()
        assert wrapped.recv(1) == b""  # end of stream is passed through
    finally:
        a.close()


def _collect(broker: DevBroker, topic: str) -> tuple[MqttClient, list[Message], threading.Event, int]:
    got: list[Message] = []
    done = threading.Event()
    expected = 2000

    def on(msg: Message) -> None:
        got.append(msg)
        if len(got) >= expected:
            done.set()

    sub = MqttClient(broker.url, f"sub-{topic.replace('/', '-')}")
    sub.subscribe(topic, on, qos=1)
    sub.start()
    time.sleep(0.2)
    return sub, got, done, expected


def test_publishes_from_other_threads_all_arrive_in_order(broker: DevBroker) -> None:
    sub, got, done, expected = _collect(broker, "fast/other")
    pub = MqttClient(broker.url, "pub-other")
    pub.start()
    try:
        def burst(k: int) -> None:
            for i in range(expected // 4):
                pub.publish("fast/other", f"{k}:{i}".encode(), qos=1)

        threads = [threading.Thread(target=burst, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert done.wait(20), f"only {len(got)} of {expected} arrived"
        for k in range(4):
            seq = [int(m.payload.split(b":")[1]) for m in got if m.payload.startswith(f"{k}:".encode())]
            assert seq == list(range(expected // 4)), f"publisher thread {k}'s messages were lost or reordered"
    finally:
        pub.stop()
        sub.stop()


def test_publishes_from_a_handler_on_the_network_thread_arrive(broker: DevBroker) -> None:
    """An echo: each request is answered from its handler (paho's thread, no wake-up byte)."""
    sub, got, done, expected = _collect(broker, "fast/answers")
    echo = MqttClient(broker.url, "echo")
    echo.subscribe("fast/requests", lambda m: echo.publish("fast/answers", m.payload, qos=1), qos=1)
    echo.start()
    pub = MqttClient(broker.url, "pub-requests")
    pub.start()
    try:
        time.sleep(0.2)
        for i in range(expected):
            pub.publish("fast/requests", str(i).encode(), qos=1)
        assert done.wait(20), f"only {len(got)} of {expected} answers arrived"
        assert [int(m.payload) for m in got] == list(range(expected))
        # And a lone message later is not stuck behind a missing wake-up.
        before = len(got)
        pub.publish("fast/requests", b"late", qos=1)
        deadline = time.monotonic() + 2.0
        while len(got) == before and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(got) == before + 1 and got[-1].payload == b"late"
    finally:
        pub.stop()
        echo.stop()
        sub.stop()


def test_queued_qos1_publishes_share_one_write_and_all_arrive(broker: DevBroker) -> None:
    sub, got, _, _ = _collect(broker, "fast/merged")
    pub = MqttClient(broker.url, "pub-merged")
    pub.start()
    try:
        inner = pub._client
        assert isinstance(inner._sock, _BufferedSocket)
        with inner._queue_lock:  # the network thread cannot write meanwhile
            for i in range(5):
                pub.publish("fast/merged", str(i).encode(), qos=1)
            queued = list(inner._out_packet)
        assert len(queued) == 1 and queued[0]["merged"], "five QoS 1 publishes should be one queued write"
        deadline = time.monotonic() + 5.0
        while len(got) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [m.payload for m in got] == [b"0", b"1", b"2", b"3", b"4"]
    finally:
        pub.stop()
        sub.stop()


def test_messages_held_back_by_the_inflight_window_are_all_sent(broker: DevBroker) -> None:
    """paho holds publishes beyond its in-flight window; they go out as acknowledgements arrive."""
    sub, got, _, _ = _collect(broker, "fast/window")
    pub = MqttClient(broker.url, "pub-window")
    pub._client.max_inflight_messages_set(2)
    pub.start()
    try:
        for i in range(200):
            pub.publish("fast/window", str(i).encode(), qos=1)
        deadline = time.monotonic() + 10.0
        while len(got) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [int(m.payload) for m in got] == list(range(200))
        assert not pub._client._maybe_held  # nothing waits any more, so acknowledgements stop scanning
    finally:
        pub.stop()
        sub.stop()


def test_routes_follow_subscription_changes(broker: DevBroker) -> None:
    a: list[bytes] = []
    b: list[bytes] = []
    c = MqttClient(broker.url, "router")
    c.subscribe("route/+", lambda m: a.append(m.payload), qos=1)
    c.start()
    pub = MqttClient(broker.url, "route-pub")
    pub.start()
    try:
        time.sleep(0.2)
        pub.publish("route/x", b"1", qos=1)
        _wait_for(lambda: a == [b"1"])
        c.subscribe("route/x", lambda m: b.append(m.payload), qos=1)  # the cached route for route/x is stale now
        time.sleep(0.3)
        pub.publish("route/x", b"2", qos=1)
        # mosquitto may deliver one copy per matching subscription; each copy goes to both handlers
        _wait_for(lambda: b"2" in b and b"2" in a)
        assert set(b) == {b"2"}
    finally:
        pub.stop()
        c.stop()


def _wait_for(cond, timeout: float = 5.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cond()


def test_publish_properties_pack_to_the_same_bytes_as_paho() -> None:
    import pytest
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from shared.mqtt import MqttError, PublishProperties

    cases = [("edgefed/v1/d/answer", b"rid-1", None), (None, b"x" * 300, 60), ("a/b", None, None), (None, None, 0),
             ("é/ü", bytes(range(256)), 4294967295)]
    for topic, corr, expiry in cases:
        ref = Properties(PacketTypes.PUBLISH)
        if expiry is not None:
            ref.MessageExpiryInterval = expiry
        if topic is not None:
            ref.ResponseTopic = topic
        if corr is not None:
            ref.CorrelationData = corr
        assert PublishProperties(topic, corr, expiry).pack() == ref.pack(), (topic, corr, expiry)
    with pytest.raises(MqttError, match="wildcards"):
        PublishProperties("a/+", None, None)
    with pytest.raises(MqttError, match="at most 65535"):
        PublishProperties(None, b"x" * 70000, None)
    with pytest.raises(MqttError, match="outside"):
        PublishProperties(None, None, -1)
