"""Operations units that live beside the transports: health, discovery, hub sync, systemd.

Each is a lifecycle unit (an async context manager) the server starts after HTTP is bound
and stops in reverse order.
"""

from __future__ import annotations
