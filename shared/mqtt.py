"""The one wrapper around paho-mqtt (MQTT v5) that every part uses.

It sets TCP_NODELAY on every connection (paho never does; without it a QoS 1 exchange costs
40-88 ms of Nagle delay), reconnects on its own, re-subscribes after a reconnect, and turns
paho's numeric return codes into ``MqttError`` at the boundary.

Two costs of paho's threaded loop are removed (``_FastPahoClient``), because they dominate a busy
hub's CPU: paho reads every packet with 3-4 ``recv`` calls (1 byte of command, 1 byte per length
byte, then the rest), and every queued packet, even a PUBACK queued by the network thread itself,
writes a byte to a socket pair to wake that thread. Here reads go through a 64 KiB buffer, and only
a packet queued from another thread wakes the network thread, once until it has written.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["BrokerAddress", "MqttError", "MqttClient", "Message", "parse_broker_url"]

log = logging.getLogger(__name__)


class MqttError(RuntimeError):
    """A broker operation failed; the message says which and why."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://HOST:PORT`` or ``mqtts://HOST:PORT``."""
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ValueError(f"broker URL {url!r} is invalid: write mqtt://HOST:PORT or mqtts://HOST:PORT")
    tls = parsed.scheme == "mqtts"
    return BrokerAddress(parsed.hostname, parsed.port or (8883 if tls else 1883), tls)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None
    correlation_data: bytes | None


Handler = Callable[[Message], None]

_READ_CHUNK = 65536
_ROUTE_CACHE_SIZE = 65536


class _BufferedSocket:
    """A socket whose ``recv`` is served from a buffer filled by large reads.

    paho asks ``pending()`` (meant for TLS) before it waits in ``select``: buffered bytes count as
    pending, so paho reads them without waiting. Everything else is the wrapped socket's.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        available = len(self._buf) - self._pos
        if available <= 0:
            data = self._sock.recv(max(bufsize, _READ_CHUNK))  # raises as the socket does (EAGAIN, SSL)
            if len(data) <= bufsize:
                return data
            self._buf, self._pos = data, 0
            available = len(data)
        n = min(bufsize, available)
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        if self._pos >= len(self._buf):
            self._buf, self._pos = b"", 0
        return out

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._buf) - self._pos + (inner() if inner is not None else 0)

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str):  # noqa: ANN204 - send, close, setblocking, setsockopt, ...
        return getattr(self._sock, name)


class PublishProperties:
    """MQTT v5 PUBLISH properties, packed once here: paho's ``Properties`` sets and packs each field
    through name lookups, a measurable share of a busy hub's CPU, and paho only ever calls ``pack()``
    on them. Same bytes as paho's (tests/unit/test_mqtt_fast.py compares them)."""

    __slots__ = ("_packed", "response_topic", "correlation_data", "message_expiry_s")

    def __init__(
        self, response_topic: str | None, correlation_data: bytes | None, message_expiry_s: int | None
    ) -> None:
        self.response_topic, self.correlation_data, self.message_expiry_s = (
            response_topic, correlation_data, message_expiry_s
        )
        body = bytearray()
        if message_expiry_s is not None:
            if not 0 <= message_expiry_s <= 0xFFFFFFFF:
                raise MqttError(f"message expiry {message_expiry_s} s is outside 0..4294967295")
            body += b"\x02" + struct.pack("!I", message_expiry_s)
        if response_topic is not None:
            if any(c in response_topic for c in "+#\x00"):
                raise MqttError(f"response topic {response_topic!r} may not hold wildcards or NUL")
            body += b"\x08" + _str16(response_topic.encode("utf-8"), "response topic")
        if correlation_data is not None:
            body += b"\x09" + _str16(bytes(correlation_data), "correlation data")
        self._packed = _varint(len(body)) + bytes(body)

    def pack(self) -> bytes:
        return self._packed

    def __str__(self) -> str:  # paho's debug log
        return (f"[ResponseTopic={self.response_topic!r}, CorrelationData={self.correlation_data!r}, "
                f"MessageExpiryInterval={self.message_expiry_s}]")


def _str16(data: bytes, what: str) -> bytes:
    if len(data) > 0xFFFF:
        raise MqttError(f"{what} is {len(data)} bytes; MQTT allows at most 65535")
    return struct.pack("!H", len(data)) + data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_MERGEABLE = frozenset({paho.PUBACK, paho.PUBREC, paho.PUBREL, paho.PUBCOMP})
_MERGE_LIMIT = 64 * 1024


def _mergeable(command: int, qos: int) -> bool:
    """Packets whose bytes can share one ``send``: paho does nothing per packet once they are written
    (QoS 0 publishes get a callback and DISCONNECT closes the socket, so those stay apart)."""
    kind = command & 0xF0
    return kind in _MERGEABLE or (kind == paho.PUBLISH and qos > 0)


class _FastPahoClient(paho.Client):
    """paho's client with buffered reads, merged writes and coalesced wake-ups of its network thread.

    Overrides private methods of paho-mqtt 2.2 (pinned in pyproject.toml; tests/unit/test_mqtt_fast.py
    checks they still exist and behave): ``_create_socket``, ``_packet_queue``, ``_update_inflight``,
    ``_messages_reconnect_reset_out`` and ``loop_write``.
    ``_queue_lock`` makes queueing (which may append to the last queued packet) and writing (which
    takes packets off the queue) exclusive.
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self._wake_pending = False
        self._queue_lock = threading.RLock()
        # paho scans every outgoing message on each PUBACK for one waiting to be sent (O(in-flight) per
        # acknowledgement); only messages held back by the in-flight window wait, so scan only then.
        self._maybe_held = False

    def publish(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        info = super().publish(*args, **kwargs)
        held = self._out_messages.get(info.mid)
        if held is not None and held.state == paho.mqtt_ms_queued:
            self._maybe_held = True
        return info

    def _messages_reconnect_reset_out(self) -> None:
        super()._messages_reconnect_reset_out()
        self._maybe_held = True

    def _update_inflight(self):  # noqa: ANN202
        if not self._maybe_held:
            return paho.MQTT_ERR_SUCCESS
        with self._out_message_mutex:
            rc = super()._update_inflight()
            self._maybe_held = any(m.state == paho.mqtt_ms_queued for m in self._out_messages.values())
        return rc

    def _create_socket(self):  # noqa: ANN202
        sock = super()._create_socket()
        return sock if self._transport == "websockets" else _BufferedSocket(sock)

    def _packet_queue(self, command, packet, mid, qos, info=None):  # noqa: ANN001, ANN202
        thread = self._thread
        if thread is None:  # no network thread (connecting, stopped): paho's own way
            return super()._packet_queue(command, packet, mid, qos, info)
        with self._queue_lock:
            queue = self._out_packet
            last = queue[-1] if queue else None
            if (
                last is not None
                and _mergeable(command, qos)
                and _mergeable(last["command"], last["qos"])
                and last["to_process"] + len(packet) <= _MERGE_LIMIT
            ):
                # Written after the last queued packet anyway: one send for both. Nothing reads
                # command/mid/info of a written QoS>0 publish or acknowledgement.
                if not last.get("merged"):  # a buffer of our own, then appended to in place
                    last["packet"], last["merged"] = bytearray(last["packet"]), True
                last["packet"] += packet
                last["to_process"] += len(packet)
            else:
                queue.append(
                    {"command": command, "mid": mid, "qos": qos, "pos": 0, "to_process": len(packet),
                     "packet": packet, "info": info}
                )
        # On the network thread (a PUBACK, a publish from a handler) nothing needs waking: its loop
        # writes whatever is queued before it waits again. From another thread, wake it unless a
        # wake-up is already pending; the flag is read after queueing, and the network thread
        # clears it before it writes, so a packet is never left queued while the thread waits.
        if threading.current_thread() is not thread and not self._wake_pending:
            self._wake_pending = True
            self._wake()
        return paho.MQTT_ERR_SUCCESS

    def _wake(self) -> None:
        pair = self._sockpairW
        if pair is not None:
            try:
                pair.send(b"0")
            except BlockingIOError:
                pass

    def loop_write(self):  # noqa: ANN201
        with self._queue_lock:
            self._wake_pending = False  # packets queued from now on wake the thread again
            return super().loop_write()


class MqttClient:
    """A paho MQTT v5 client with a background network thread.

    Handlers run on paho's network thread: they must be quick and must not block on the broker.
    """

    def __init__(
        self,
        broker_url: str,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        keepalive: int = 30,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.address = parse_broker_url(broker_url)
        self.client_id = client_id
        self._keepalive = keepalive
        self._subscriptions: dict[str, tuple[int, Handler]] = {}
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._on_connect_hooks: list[Callable[[], None]] = []
        self._client = _FastPahoClient(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        if username:
            self._client.username_pw_set(username, password)
        if self.address.tls:
            ctx = ssl.create_default_context(cafile=ca_file)
            self._client.tls_set_context(ctx)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        # Keep paho's in-flight window large enough for bursts of QoS 1 escalations.
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_unsubscribe = self._handle_unsubscribe
        self._unsub_waiters: dict[int, threading.Event] = {}
        self._unsub_acked: dict[int, bool] = {}
        # Left topics keep their handler (never re-subscribed) for messages still on the way.
        self._unsubscribed: dict[str, tuple[int, Handler]] = {}
        # topic -> its handlers, so a busy subscriber matches each topic against its patterns once
        self._routes: dict[str, list[Handler]] = {}

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, wait: float | None = 10.0) -> None:
        """Connect in the background; with ``wait`` block until connected or raise MqttError."""
        self._connect_args()
        self._client.loop_start()
        if wait is not None and not self._connected.wait(wait):
            self.stop()
            raise MqttError(f"no connection to broker {self.address.url} within {wait:.0f} s")

    def input_waiting(self) -> bool:
        """True when more received bytes wait to be handled (buffered, or readable on the socket): a
        handler can tell that it is not the last message of a burst."""
        sock = self._client.socket()
        if sock is None:
            return False
        pending = getattr(sock, "pending", None)
        if pending is not None and pending() > 0:
            return True
        try:
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def open_unthreaded(self) -> socket.socket:
        """Open the connection without a network thread and return its socket: the caller runs many
        clients in one thread (load generators), calling ``pump`` when the socket is readable and
        ``tick`` every few seconds; publishes are written at once. The CONNACK, and with it
        ``connected`` and the subscriptions, arrive through ``pump``. No reconnection in this mode."""
        self._connect_args()
        try:
            self._client.reconnect()
        except OSError as exc:
            raise MqttError(f"cannot connect to {self.address.url}: {exc}") from exc
        sock = self._client.socket()
        if sock is None:
            raise MqttError(f"no socket after connecting to {self.address.url}")
        return sock

    def pump(self) -> bool:
        """Unthreaded mode: read and handle everything received, write what is queued; False once the
        connection is lost."""
        c = self._client
        rc = c.loop_read()
        sock = c.socket()
        while rc == paho.MQTT_ERR_SUCCESS and sock is not None and sock.pending() > 0:
            rc = c.loop_read()
            sock = c.socket()
        if rc == paho.MQTT_ERR_SUCCESS and c.want_write():
            rc = c.loop_write()
        return rc == paho.MQTT_ERR_SUCCESS and c.socket() is not None

    def tick(self) -> None:
        """Unthreaded mode: keepalive pings and retries (call every few seconds)."""
        self._client.loop_misc()

    def _connect_args(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        try:
            self._client.connect_async(
                self.address.host, self.address.port, keepalive=self._keepalive, clean_start=True,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot start connecting to {self.address.url}: {exc}") from exc

    def stop(self) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread."""
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` (on the network thread) after every successful (re)connection."""
        self._on_connect_hooks.append(hook)

    # --- pub/sub ---------------------------------------------------------------------------
    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        with self._lock:
            self._subscriptions[topic] = (qos, handler)
            self._unsubscribed.pop(topic, None)
            self._routes.clear()
        if self.connected:
            self._check(self._client.subscribe(topic, qos=qos)[0], f"subscribe to {topic}")

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        message_expiry_s: int | None = None,
    ) -> paho.MQTTMessageInfo:
        """Queue a publish; raise MqttError when the client is not connected."""
        props = None
        if response_topic is not None or correlation_data is not None or message_expiry_s is not None:
            props = PublishProperties(response_topic, correlation_data, message_expiry_s)
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        self._check(info.rc, f"publish to {topic}")
        return info

    def unsubscribe(self, topic: str, wait: float | None = None) -> bool:
        """Stop receiving ``topic`` (also after reconnects); with ``wait``, block until the broker
        acknowledged it. Returns True when acknowledged (or not connected, so nothing to undo)."""
        with self._lock:
            entry = self._subscriptions.pop(topic, None)
            if entry is not None:  # what the broker sent before it processed the unsubscribe still arrives
                self._unsubscribed[topic] = entry
            self._routes.clear()
        if not self.connected:
            return True
        done = threading.Event()
        rc, mid = self._client.unsubscribe(topic)
        self._check(rc, f"unsubscribe from {topic}")
        with self._lock:
            if self._unsub_acked.pop(mid, False):  # the ack beat us here
                return True
            self._unsub_waiters[mid] = done
        return done.wait(wait) if wait is not None else True

    # --- paho callbacks --------------------------------------------------------------------
    def _handle_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        with self._lock:
            done = self._unsub_waiters.pop(mid, None)
            if done is None:
                self._unsub_acked[mid] = True
        if done is not None:
            done.set()

    def _handle_connect(self, client, userdata, flags, reason: ReasonCode, properties) -> None:  # noqa: ANN001
        if reason.is_failure:
            log.warning("broker %s refused connection: %s", self.address.url, reason)
            return
        sock = client.socket()
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # a TLS-wrapped or closed socket may refuse; latency only
                log.debug("could not set TCP_NODELAY", exc_info=True)
        with self._lock:
            subs = list(self._subscriptions.items())
        for topic, (qos, _) in subs:
            client.subscribe(topic, qos=qos)
        self._connected.set()
        for hook in self._on_connect_hooks:
            try:
                hook()
            except Exception:  # a hook's bug must not kill the network thread
                log.exception("on-connect hook failed")

    def _handle_disconnect(self, client, userdata, flags, reason, properties) -> None:  # noqa: ANN001
        self._connected.clear()
        if reason is not None and getattr(reason, "value", 0) != 0:
            log.info("disconnected from %s: %s; reconnecting", self.address.url, reason)

    def _handle_message(self, client, userdata, msg: paho.MQTTMessage) -> None:  # noqa: ANN001
        props = getattr(msg, "properties", None)
        message = Message(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            response_topic=getattr(props, "ResponseTopic", None) if props else None,
            correlation_data=getattr(props, "CorrelationData", None) if props else None,
        )
        handlers = self._routes.get(msg.topic)
        if handlers is None:
            with self._lock:
                subs = [*self._subscriptions.items(), *self._unsubscribed.items()]
                handlers = [h for pattern, (_, h) in subs if _matches(pattern, msg.topic)]
                if len(self._routes) >= _ROUTE_CACHE_SIZE:
                    self._routes.clear()
                self._routes[msg.topic] = handlers
        for handler in handlers:
            try:
                handler(message)
            except Exception:  # one bad message must not kill the network thread
                log.exception("handler for %s failed", msg.topic)

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc != paho.MQTT_ERR_SUCCESS:
            raise MqttError(f"cannot {what}: {paho.error_string(rc)}")


def _matches(pattern: str, topic: str) -> bool:
    if pattern.startswith("$share/"):
        pattern = pattern.split("/", 2)[2]
    return paho.topic_matches_sub(pattern, topic)
