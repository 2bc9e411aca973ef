"""Periodic configuration backups to the hub: ``appliance backup --to-hub`` on a schedule.

With ``hub.backup_interval`` set, a lifecycle unit started beside the hub sync writes the
device's configuration backup (no models, no outbox: what the hub keeps) every interval,
sealed with ``hub.backup_key_file`` (or the passphrase in ``$APPLIANCE_BACKUP_PASSPHRASE``),
and uploads it with the device's hub token, the same way the command does. A failed
upload is logged, shown in /health (unit ``backup``) and tried again at the next interval.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from appliance.backup import device, hubclient
from appliance.backup.archive import BackupError, Secret
from appliance.config import Config
from appliance.core.service import Core
from appliance.errors import ConfigError
from appliance.ops.hubsync import outbox_path, resolve_token
from appliance.ops.instance import state_directory
from appliance.ops.units import BackgroundUnit

log = logging.getLogger(__name__)

PASSPHRASE_ENV = "APPLIANCE_BACKUP_PASSPHRASE"  # as `appliance backup` reads it


class PeriodicBackup(BackgroundUnit):
    """Lifecycle unit: uploads the configuration backup every ``hub.backup_interval``."""

    name = "appliance-backup-upload"

    def __init__(
        self, config: Config, core: Core, config_path: Path | None, env: Mapping[str, str]
    ) -> None:
        self._config = config
        self._core = core
        self._env = env
        self._source = device.Source(
            config, config_path, state_directory(env), outbox_path(config, env), env
        )
        self._token = resolve_token(config, env)
        self._secret = _secret(config, env)
        self._remove_status: Callable[[], None] = lambda: None
        self.uploads = 0
        self.last_upload: float | None = None
        self.last_error: str | None = None

    async def __aenter__(self) -> PeriodicBackup:
        self._remove_status = self._core.add_status("backup", self.status)
        return await super().__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove_status()
        await super().__aexit__(exc_type, exc, tb)

    def status(self) -> dict[str, Any]:
        return {
            "interval": self._config.hub.backup_interval,
            "uploads": self.uploads,
            "last_upload": self.last_upload,
            "last_error": self.last_error,
        }

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._config.hub.backup_interval)
            try:
                size = await asyncio.to_thread(self._upload)
            except (BackupError, ConfigError, OSError) as exc:
                self.last_error = str(exc)
                log.warning(
                    "backup upload to the hub failed (next try in %gs): %s",
                    self._config.hub.backup_interval,
                    exc,
                )
                continue
            self.uploads += 1
            self.last_upload = time.time()
            self.last_error = None
            log.info("configuration backup kept on the hub (%s bytes)", size)

    def _upload(self) -> Any:
        hub = self._config.hub
        with tempfile.TemporaryDirectory(prefix="appliance-backup-") as tmp:
            written = device.create(
                self._source, Path(tmp) / "backup.tar", self._secret, with_outbox=False
            )
            answer = hubclient.upload(
                hub.url,
                self._config.device.id,
                self._token,
                written.path,
                ca_file=hub.tls_ca_file,
                cert_file=hub.tls_cert_file,
                key_file=hub.tls_key_file,
                timeout=hub.timeout * 4,
            )
        return answer.get("size")


def _secret(config: Config, env: Mapping[str, str]) -> Secret:
    key_file = config.hub.backup_key_file
    try:
        if key_file is not None:
            return Secret.from_key_file(key_file)
        if env.get(PASSPHRASE_ENV):
            return Secret.from_passphrase(env[PASSPHRASE_ENV])
    except BackupError as exc:
        raise ConfigError(f"hub.backup_key_file = {str(key_file)!r}: {exc}") from None
    raise ConfigError(
        f"hub.backup_interval = {config.hub.backup_interval:g} needs a secret to seal the "
        f"backups: set hub.backup_key_file or ${PASSPHRASE_ENV}"
    )


__all__ = ["PeriodicBackup"]
