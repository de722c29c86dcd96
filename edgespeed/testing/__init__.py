"""The fleet harness: a whole EdgeSpeed fleet on one machine, for tests, benchmarks and the demo.

Everything a harness needs, and cleans up after itself:

* `make_pki` / `FleetPki`: a fleet CA and every identity (broker, coordinators,
  devices, auditors) in one folder, the ``pki_dir`` of every member.
* `start_broker`: Mosquitto on free loopback ports, in the production
  configuration (mutual TLS only, the fleet ACL, persistence) or a
  development one (plain and TLS listeners; amqtt where Mosquitto is missing).
* `agent_config`, `coordinator_config`, `agent_toml`, `write_agent_toml`,
  `coordinator_toml`, `write_coordinator_toml`: the members' configurations,
  as objects and as the TOML files the processes read.
* `agent_process`, `coordinator_process`, `start_process` / `FleetProcess`:
  members as processes, output in a log file, stopped and always reaped.
* `Fleet` / `fleet`: all of it together, with agents in this process
  (`edgespeed.agent.Device`) or as processes.
* `StubCoordinator`: the coordinator's side of the protocol alone, to test agents.
* `wait_ready`, and small real ONNX models (`identity_onnx`, `affine_onnx`, `big_onnx`).

A two-agent fleet and one real task::

    async with fleet(devices=2) as f, f.coordinator() as c:
        await c.publish_model([affine_onnx(f.base / "affine.onnx")], name="affine")
        await wait_ready(c, "affine", 2)
        y = await c.infer("affine", np.ones((1, 4), np.float32))

Importing this package loads neither the agent nor the coordinator; they are
imported where a harness first needs them.
"""

from edgespeed.testing.broker import broker_settings, broker_url, start_broker
from edgespeed.testing.configs import (
    TEST_AGENT_SETTINGS,
    TEST_COORDINATOR_SETTINGS,
    agent_config,
    agent_toml,
    coordinator_config,
    coordinator_toml,
    wait_ready,
    write_agent_toml,
    write_coordinator_toml,
)
from edgespeed.testing.fleet import Fleet, fleet
from edgespeed.testing.models import affine_onnx, big_onnx, identity_onnx
from edgespeed.testing.pki import FleetPki, make_pki
from edgespeed.testing.processes import FleetProcess, agent_process, coordinator_process, start_process
from edgespeed.testing.stub import Shard, StubCoordinator

__all__ = [
    "Fleet",
    "FleetPki",
    "FleetProcess",
    "Shard",
    "StubCoordinator",
    "TEST_AGENT_SETTINGS",
    "TEST_COORDINATOR_SETTINGS",
    "affine_onnx",
    "agent_config",
    "agent_process",
    "agent_toml",
    "big_onnx",
    "broker_settings",
    "broker_url",
    "coordinator_config",
    "coordinator_process",
    "coordinator_toml",
    "fleet",
    "identity_onnx",
    "make_pki",
    "start_broker",
    "start_process",
    "wait_ready",
    "write_agent_toml",
    "write_coordinator_toml",
]
