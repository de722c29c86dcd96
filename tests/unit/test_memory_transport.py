import pytest

from edgespeed.errors import ConfigError, TransportClosedError, TransportTimeoutError
from edgespeed.transport import MemoryBroker, MemoryTransport, Will, topic_matches
from edgespeed.transport.base import validate_filter
from tests.conftest import take


async def test_publish_subscribe_with_wildcards() -> None:
    hub = MemoryBroker()
    async with MemoryTransport(hub, "a") as a, MemoryTransport(hub, "b") as b:
        await b.subscribe("x/+/z", "y/#")
        await a.publish("x/1/z", b"1")
        await a.publish("x/1/other", b"no")
        await a.publish("y/deep/er", b"2")
        got = await take(b, 2)
        assert [m.payload for m in got] == [b"1", b"2"]


async def test_retained_messages_reach_late_subscribers() -> None:
    hub = MemoryBroker()
    async with MemoryTransport(hub, "a") as a, MemoryTransport(hub, "b") as b:
        await a.publish("state", b"online", retain=True)
        await b.subscribe("state")
        (m,) = await take(b, 1)
        assert m.retain and m.payload == b"online"
        await a.publish("state", b"", retain=True)  # empty retained payload clears it
        assert hub.retained("#") == []


async def test_will_is_published_on_abort_not_on_close() -> None:
    hub = MemoryBroker()
    async with MemoryTransport(hub, "watcher") as w:
        await w.subscribe("death/#")
        polite = MemoryTransport(hub, "p", will=Will("death/p", b"gone"))
        async with polite:
            pass
        crash = MemoryTransport(hub, "c", will=Will("death/c", b"gone"))
        await crash.__aenter__()
        await crash.abort()
        (m,) = await take(w, 1)
        assert m.topic == "death/c"


async def test_full_queue_applies_backpressure_then_errors() -> None:
    hub = MemoryBroker()
    async with MemoryTransport(hub, "a", publish_timeout=0.2) as a, MemoryTransport(hub, "b", queue_size=2) as b:
        await b.subscribe("t")
        await a.publish("t", b"1")
        await a.publish("t", b"2")
        with pytest.raises(TransportTimeoutError, match="queue full"):
            await a.publish("t", b"3")
        assert [m.payload for m in await take(b, 2)] == [b"1", b"2"]


async def test_misuse_is_a_clear_error() -> None:
    hub = MemoryBroker()
    t = MemoryTransport(hub, "a")
    with pytest.raises(TransportClosedError):
        await t.publish("x", b"")
    async with t:
        with pytest.raises(ConfigError):
            await t.publish("x/#", b"")
        with pytest.raises(ConfigError):
            await t.subscribe("x/#/y")
        with pytest.raises(ConfigError):
            await t.publish("x", b"", qos=3)
    with pytest.raises(TransportClosedError):
        async with t:
            pass


@pytest.mark.parametrize(
    ("f", "topic", "expected"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("+/+", "a", False),
        ("#", "$SYS/x", False),
        ("a/b", "a/b/c", False),
        ("+", "", True),
    ],
)
def test_topic_matching(f: str, topic: str, expected: bool) -> None:
    assert topic_matches(validate_filter(f), topic) is expected


async def test_consumer_ends_when_the_transport_closes_with_a_full_queue() -> None:
    hub = MemoryBroker()
    async with MemoryTransport(hub, "a") as a:
        b = MemoryTransport(hub, "b", queue_size=2)
        await b.__aenter__()
        await b.subscribe("t")
        await a.publish("t", b"1")
        await a.publish("t", b"2")
        await b.close()
        got = [m.payload async for m in b.messages()]
        assert got == [b"1", b"2"]  # what was delivered is still handed over, then the iteration ends
