"""A device's backup to and from the hub: ``PUT``/``GET /api/v1/devices/{id}/backup``.

Both carry the device's own hub token; the archive travels as it is, its secrets still
encrypted with the device's passphrase or key file, so the hub never holds them in clear.
Blocking (``urllib``): the CLI runs one request and exits.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from appliance.backup.archive import BackupError

CONTENT_TYPE = "application/x-appliance-backup"


def _url(hub: str, device: str) -> str:
    return f"{hub.rstrip('/')}/api/v1/devices/{urllib.parse.quote(device, safe='')}/backup"


def _context(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context


def _call(request: urllib.request.Request, context: ssl.SSLContext, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
            data: bytes = answer.read()
            return data
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError):
            reason = ""
        raise BackupError(f"the hub answered {exc.code}: {reason or exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BackupError(f"cannot reach the hub at {request.full_url}: {reason}") from None


def upload(
    hub: str,
    device: str,
    token: str,
    archive: Path,
    *,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    """Keep ``archive`` on the hub as the device's latest backup; the hub's answer."""
    request = urllib.request.Request(
        _url(hub, device),
        data=archive.read_bytes(),
        method="PUT",
        headers={"Authorization": f"Bearer {token}", "Content-Type": CONTENT_TYPE},
    )
    answer = json.loads(_call(request, _context(ca_file, cert_file, key_file), timeout))
    if not isinstance(answer, dict):
        raise BackupError("the hub's answer to the upload is not a JSON object")
    return answer


def download(
    hub: str,
    device: str,
    token: str,
    out: Path,
    *,
    ca_file: Path | None = None,
    timeout: float = 60,
) -> int:
    """The device's latest backup from the hub, written to ``out``; its size."""
    request = urllib.request.Request(
        _url(hub, device), method="GET", headers={"Authorization": f"Bearer {token}"}
    )
    data = _call(request, _context(ca_file), timeout)
    out.write_bytes(data)
    return len(data)


__all__ = ["CONTENT_TYPE", "download", "upload"]
