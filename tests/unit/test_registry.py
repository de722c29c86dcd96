"""The device registry and the placement policies."""

import pytest

from edgespeed.coordinator import DeviceStatus, Registry
from edgespeed.coordinator.policies import LeastLoaded, Pinned, Requirements, RoundRobin, capable
from edgespeed.errors import ConfigError, TopicError
from edgespeed.protocol.messages import Birth, Death, DeviceCard, Heartbeat


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def card(
    device_id: str,
    backends: tuple[str, ...] = ("onnx",),
    accelerators: tuple[str, ...] = ("cpu",),
    memory: int = 4 << 30,
) -> DeviceCard:
    return DeviceCard(device_id, "x86_64", "linux", "0.1.0", 4, memory, backends, accelerators)


def test_epochs_make_stale_deaths_and_heartbeats_harmless() -> None:
    registry = Registry(clock=Clock())
    registry.on_birth(Birth(card("dev-a"), epoch=1))
    registry.on_birth(Birth(card("dev-a"), epoch=2))  # it restarted
    assert registry.on_birth(Birth(card("dev-a"), epoch=1)) is None  # an old retained birth
    assert not registry.on_death("dev-a", Death(1))  # the first session's will, arriving late
    assert registry.get("dev-a").status is DeviceStatus.ONLINE  # type: ignore[union-attr]
    assert not registry.on_heartbeat("dev-a", Heartbeat(1, 0.5, 1))
    assert registry.on_heartbeat("dev-a", Heartbeat(2, 0.5, 1, models=("digits",)))
    assert registry.get("dev-a").models == ("digits",)  # type: ignore[union-attr]
    assert registry.on_death("dev-a", Death(2))
    assert registry.get("dev-a").status is DeviceStatus.LOST  # type: ignore[union-attr]
    assert not registry.on_heartbeat("dev-x", Heartbeat(1, 0.0, 0))  # never born


def test_a_retained_birth_gets_no_work_until_its_session_heartbeats() -> None:
    registry = Registry(clock=Clock())
    registry.on_birth(Birth(card("dev-a"), epoch=5), retained=True)  # maybe long dead
    assert registry.online() == []
    assert registry.get("dev-a").status is DeviceStatus.SUSPECT  # type: ignore[union-attr]
    assert registry.on_birth(Birth(card("dev-a"), epoch=5)) is None  # the same birth again changes nothing
    assert registry.on_heartbeat("dev-a", Heartbeat(5, 0.0, 0))
    assert [d.device_id for d in registry.online()] == ["dev-a"]


def test_missed_heartbeats_make_a_device_suspect_then_lost() -> None:
    clock = Clock()
    registry = Registry(heartbeat_s=10, suspect_after=2.5, lost_after=5, clock=clock)
    registry.on_birth(Birth(card("dev-a"), epoch=1))
    registry.on_birth(Birth(card("dev-b"), epoch=1))
    clock.t += 20
    registry.on_heartbeat("dev-b", Heartbeat(1, 0.1, 0))
    clock.t += 10  # dev-a silent for 30 s, dev-b for 10 s
    assert registry.sweep() == [("dev-a", DeviceStatus.SUSPECT)]
    assert [d.device_id for d in registry.online()] == ["dev-b"]
    registry.on_heartbeat("dev-a", Heartbeat(1, 0.1, 0))  # it was only slow
    assert registry.get("dev-a").status is DeviceStatus.ONLINE  # type: ignore[union-attr]
    clock.t += 60
    assert sorted(registry.sweep()) == [("dev-a", DeviceStatus.LOST), ("dev-b", DeviceStatus.LOST)]
    assert registry.sweep() == []  # lost stays lost until a new birth
    with pytest.raises(ConfigError):
        Registry(suspect_after=5, lost_after=2)


def test_capability_filter() -> None:
    registry = Registry(clock=Clock())
    registry.on_birth(Birth(card("cpu-gw", ("onnx", "tflite")), 1))
    registry.on_birth(Birth(card("gpu-gw", ("onnx", "torch"), ("cpu", "cuda:0 NVIDIA L4 (22 GiB)"), 64 << 30), 1))
    registry.on_birth(Birth(card("npu-gw", ("npu",), ("cpu", "npu:0 Ascend910B (0 GiB)")), 1))
    registry.on_heartbeat("cpu-gw", Heartbeat(1, 0.0, 0, models=("digits",)))
    online = registry.online()

    def ids(need: Requirements) -> list[str]:
        return [d.device_id for d in capable(online, need)]

    assert ids(Requirements(formats=("safetensors",))) == ["gpu-gw", "npu-gw"]
    assert ids(Requirements(formats=("tflite",))) == ["cpu-gw"]
    assert ids(Requirements(accelerator="cuda")) == ["gpu-gw"]
    assert ids(Requirements(backend="npu")) == ["npu-gw"]
    assert ids(Requirements(min_memory_bytes=32 << 30)) == ["gpu-gw"]
    assert ids(Requirements(model="digits")) == ["cpu-gw"]
    assert ids(Requirements(formats=("onnx",), accelerator="npu")) == []


def test_policies() -> None:
    registry = Registry(clock=Clock())
    for name, load, depth in (("dev-c", 0.5, 1), ("dev-a", 0.2, 5), ("dev-b", 0.2, 2)):
        registry.on_birth(Birth(card(name), 1))
        registry.on_heartbeat(name, Heartbeat(1, load, depth))
    online = registry.online()
    assert LeastLoaded().choose(online, task_id="t").device_id == "dev-b"  # type: ignore[union-attr]
    assert LeastLoaded().choose([], task_id="t") is None
    rr = RoundRobin()
    assert [rr.choose(online, task_id="t").device_id for _ in range(4)] == [  # type: ignore[union-attr]
        "dev-a",
        "dev-b",
        "dev-c",
        "dev-a",
    ]
    assert rr.choose([d for d in online if d.device_id != "dev-b"], task_id="t").device_id == "dev-c"  # type: ignore[union-attr]
    assert Pinned("dev-x", "dev-c").choose(online, task_id="t").device_id == "dev-c"  # type: ignore[union-attr]
    assert Pinned("dev-x").choose(online, task_id="t") is None
    with pytest.raises(TopicError):
        Pinned("bad/id")
