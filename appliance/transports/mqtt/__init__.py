"""The MQTT transport: requests and replies, stream rules, state documents and Home
Assistant discovery over a broker (aiomqtt on paho-mqtt, MQTT 5 and 3.1.1).

Like every transport it only translates: messages are parsed, handed to
:class:`~appliance.core.service.Core`, and the results published. See docs/mqtt.md for the
topic layout and the reply envelope.
"""

from __future__ import annotations

from appliance.transports.mqtt.transport import MqttTransport

__all__ = ["MqttTransport"]
