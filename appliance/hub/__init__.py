"""The fleet hub: a separate aiohttp service that appliances report to.

Appliances upload heartbeats, alerts and events from their durable outbox
(``POST /api/v1/ingest``, one bearer token per enrolled device); the hub stores them
(SQLite by default, PostgreSQL for large fleets), marks devices that stop reporting as
offline, and shows the fleet on a REST API and a self-contained web dashboard.
"""

from __future__ import annotations
