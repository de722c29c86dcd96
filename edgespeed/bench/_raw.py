"""Raw paho-mqtt peers for the baselines, run as processes: ``echo`` answers requests, ``sink`` counts bytes.

python bench/_raw.py echo URL PKI NAME         raw/NAME/req -> raw/NAME/resp, same payload, QoS 1
python bench/_raw.py sink URL PKI NAME BYTES   reads raw/sink; after BYTES, publishes raw/NAME/done
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from edgespeed.bench._fleet import raw_client


def main() -> None:
    role, url, pki, name = sys.argv[1:5]
    client = raw_client(url, Path(pki), name)
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    if role == "echo":
        response = f"raw/{name}/resp"

        def echo(c: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
            c.publish(response, message.payload, qos=1)

        client.on_message = echo
        client.subscribe(f"raw/{name}/req", qos=1)
    elif role == "sink":
        expected = int(sys.argv[5])
        got = [0]

        def count(c: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
            got[0] += len(message.payload)
            if got[0] >= expected:
                got[0] = 0
                c.publish(f"raw/{name}/done", b"1", qos=1)

        client.on_message = count
        client.subscribe("raw/sink", qos=1)
    else:
        raise SystemExit(f"unknown role {role}")
    subscribed.wait(10)
    print("ready", flush=True)
    threading.Event().wait()  # until terminated; paho's loop runs in its thread


if __name__ == "__main__":
    main()
