"""Transports: how EdgeSpeed moves bytes between devices over MQTT."""

from edgespeed.transport.base import Message, Transport, TransportState, Will, topic_matches
from edgespeed.transport.broker import BrokerSettings, BrokerTls, EmbeddedBroker, find_mosquitto
from edgespeed.transport.config import Backoff, MqttConfig, TlsConfig, parse_broker_url
from edgespeed.transport.memory import MemoryBroker, MemoryTransport
from edgespeed.transport.mqtt import MqttTransport

__all__ = [
    "Backoff",
    "BrokerSettings",
    "BrokerTls",
    "EmbeddedBroker",
    "MemoryBroker",
    "MemoryTransport",
    "Message",
    "MqttConfig",
    "MqttTransport",
    "TlsConfig",
    "Transport",
    "TransportState",
    "Will",
    "find_mosquitto",
    "parse_broker_url",
    "topic_matches",
]
