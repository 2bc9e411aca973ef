"""Hub storage: one interface (:class:`~.base.Storage`), SQLite and PostgreSQL behind it."""

from __future__ import annotations

from pathlib import Path

from appliance.errors import ConfigError
from appliance.hub.storage.base import Storage


def from_url(url: str, *, pool_size: int = 10) -> Storage:
    """``sqlite:///ABSOLUTE/PATH`` or ``postgresql://...``; backends are imported lazily."""
    if url.startswith("sqlite:///"):
        from appliance.hub.storage.sqlite import SqliteStorage

        return SqliteStorage(Path(url.removeprefix("sqlite://")))
    if url.startswith(("postgresql://", "postgres://")):
        from appliance.hub.storage.postgres import PostgresStorage

        return PostgresStorage(url, pool_size=pool_size)
    raise ConfigError(f"storage.url = {url!r}: expected sqlite:///PATH or postgresql://...")


__all__ = ["Storage", "from_url"]
