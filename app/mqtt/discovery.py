"""Topics of the MQTT bridge and the Home Assistant discovery configs that announce a session.

Home Assistant creates entities from retained JSON configs at
``<discovery_prefix>/<component>/<node_id>/<object_id>/config``. Each session becomes one
device with two entities: a sensor whose state is the tracked activity (``unknown`` until one
is confirmed, so the sensor is an ``enum`` of the classes plus ``unknown``) and an event entity
that fires on every transition, its ``event_type`` the activity entered. Both are available
while the bridge's status topic says ``online``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from app.tracker import UNKNOWN

ONLINE, OFFLINE = "online", "offline"
# Home Assistant accepts only these characters in a node id.
_NODE_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class Topics:
    prefix: str = "dmft"
    discovery_prefix: str = "homeassistant"

    @property
    def samples(self) -> str:
        """What the bridge subscribes to: every session's chunks."""
        return f"{self.prefix}/+/samples"

    @property
    def status(self) -> str:
        """The bridge's availability: retained ``online``, and ``offline`` as its last will."""
        return f"{self.prefix}/bridge/status"

    @property
    def rejected(self) -> str:
        """Where a chunk whose topic names no valid session is answered: not on a topic made of that
        name, which a broker may refuse (and drop the connection for)."""
        return f"{self.prefix}/bridge/rejected"

    @property
    def birth(self) -> str:
        """Where Home Assistant says ``online`` when it (re)starts, and wants the configs again."""
        return f"{self.discovery_prefix}/status"

    def session_of(self, samples_topic: str) -> str | None:
        """The session a samples topic belongs to; None for any other topic."""
        head, tail = f"{self.prefix}/", "/samples"
        if samples_topic.startswith(head) and samples_topic.endswith(tail):
            session_id = samples_topic[len(head) : -len(tail)]
            return session_id if session_id and "/" not in session_id else None
        return None

    def session(self, session_id: str, leaf: str) -> str:
        """``<prefix>/<session>/<leaf>``: ``state``, ``transition`` or ``error``."""
        return f"{self.prefix}/{session_id}/{leaf}"

    def node(self, session_id: str) -> str:
        """The session's node id: readable, and distinct even where ids differ only in characters that
        Home Assistant does not accept (``kitchen.1`` and ``kitchen:1``)."""
        digest = hashlib.sha256(session_id.encode()).hexdigest()[:8]
        return f"dmft_{_NODE_UNSAFE.sub('_', session_id)}_{digest}"

    def sensor_config(self, session_id: str) -> str:
        return f"{self.discovery_prefix}/sensor/{self.node(session_id)}/activity/config"

    def event_config(self, session_id: str) -> str:
        return f"{self.discovery_prefix}/event/{self.node(session_id)}/transition/config"


def discovery_configs(
    topics: Topics, session_id: str, classes: list[str], version: str
) -> list[tuple[str, dict[str, Any]]]:
    """The retained ``(topic, config)`` pairs that make a session a device in Home Assistant."""
    node = topics.node(session_id)
    activities = [*classes, UNKNOWN]
    common = {
        "availability_topic": topics.status,
        "payload_available": ONLINE,
        "payload_not_available": OFFLINE,
        "device": {
            "identifiers": [node],
            "name": f"Activity {session_id}",
            "manufacturer": "DMFT activity service",
            "model": "DMFT human activity recognition",
            "sw_version": version,
        },
    }
    state = topics.session(session_id, "state")
    sensor = {
        "name": "Activity",
        "unique_id": f"{node}_activity",
        "state_topic": state,
        "value_template": "{{ value_json.activity }}",
        # confidence, since, model and updated_at become the sensor's attributes.
        "json_attributes_topic": state,
        "device_class": "enum",
        "options": activities,
        "icon": "mdi:run",
        **common,
    }
    event = {
        "name": "Activity change",
        "unique_id": f"{node}_transition",
        "state_topic": topics.session(session_id, "transition"),
        "event_types": activities,
        "icon": "mdi:swap-horizontal",
        **common,
    }
    return [(topics.sensor_config(session_id), sensor), (topics.event_config(session_id), event)]
