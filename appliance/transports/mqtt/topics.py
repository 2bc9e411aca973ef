"""The topic layout of one appliance, in one place.

Under the device's base topic (``appliance/<device id>`` unless configured)::

    <base>/availability         retained "online" / "offline" (the last will)
    <base>/info                 retained: version, HTTP URL, models and their state
    <base>/stats                retained, periodic: per-model and system statistics
    <base>/alert                retained: "ON" while a stream rule's latest window is anomalous
    <base>/infer/<model>        requests (JSON); <base>/infer/<model>/msgpack: MessagePack
    <base>/result/<model>       replies to requests that named no reply topic
    <base>/error                error replies that have no reply topic to go to

and, with a shared group, ``<fleet>/infer/<model>`` through ``$share/<group>/...``.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.transports.mqtt.envelope import MSGPACK_SUFFIX, Format


@dataclass(frozen=True)
class RequestTopic:
    """What a request's topic says: the model and, by suffix, the payload format."""

    model: str
    format: Format | None  # None: no suffix (JSON unless the content type says otherwise)
    fleet: bool


@dataclass(frozen=True)
class Topics:
    base: str
    fleet: str
    shared_group: str
    discovery_prefix: str | None  # None: no Home Assistant discovery

    @property
    def availability(self) -> str:
        return f"{self.base}/availability"

    @property
    def info(self) -> str:
        return f"{self.base}/info"

    @property
    def stats(self) -> str:
        return f"{self.base}/stats"

    @property
    def alert(self) -> str:
        return f"{self.base}/alert"

    @property
    def error(self) -> str:
        return f"{self.base}/error"

    @property
    def requests(self) -> str:
        """The filter this device's requests arrive on."""
        return f"{self.base}/infer/#"

    @property
    def shared_requests(self) -> str | None:
        """The shared-subscription filter for fleet requests, if the fleet is joined."""
        if not self.shared_group:
            return None
        return f"$share/{self.shared_group}/{self.fleet}/infer/#"

    @property
    def homeassistant_status(self) -> str | None:
        return f"{self.discovery_prefix}/status" if self.discovery_prefix else None

    def request_topic(self, model: str) -> str:
        return f"{self.base}/infer/{model}"

    def result(self, model: str) -> str:
        return f"{self.base}/result/{model}"

    def parse_request(self, topic: str) -> RequestTopic | None:
        """The model a request topic names, or ``None`` when ``topic`` is no request topic."""
        for prefix, fleet in ((self.base, False), (self.fleet if self.shared_group else "", True)):
            if not prefix or not topic.startswith(prefix + "/infer/"):
                continue
            rest = topic[len(prefix) + len("/infer/") :].split("/")
            if len(rest) == 1 and rest[0]:
                return RequestTopic(rest[0], None, fleet)
            if len(rest) == 2 and rest[0] and rest[1] == MSGPACK_SUFFIX:
                return RequestTopic(rest[0], Format.MSGPACK, fleet)
            return RequestTopic("", None, fleet)  # malformed: answered with an error
        return None

    def is_request_space(self, topic: str) -> bool:
        """A topic requests arrive on; replies must never be sent there (they would loop)."""
        if topic.startswith(self.base + "/infer/"):
            return True
        return bool(self.shared_group) and topic.startswith(self.fleet + "/infer/")

    def owns(self, topic: str) -> bool:
        """Published by this appliance (stream rules ignore these, so results never loop)."""
        return topic.startswith(self.base + "/")


def valid_topic_name(topic: str) -> bool:
    """A topic a message may be published to: no wildcards, no NUL, 1..65535 bytes."""
    return (
        bool(topic)
        and len(topic.encode("utf-8", "replace")) <= 65535
        and not any(c in topic for c in "#+\x00")
    )
