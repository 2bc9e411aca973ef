"""Logging set-up: plain lines for journald, timestamps only on a terminal or file."""

from __future__ import annotations

import logging
import os
import sys

from appliance.security.redact import RedactingFilter, SafeFormatter


def setup(level: str) -> None:
    """Configure the root logger once. Under systemd (``$JOURNAL_STREAM``) journald adds the
    timestamp itself, so lines carry none of their own, and each starts with its syslog
    priority (``<3>``) so ``journalctl -p warning`` filters by level."""
    journal = _stderr_is_journal()
    if journal:
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter(fmt) if journal else SafeFormatter(fmt))
    # Secrets and personal data redacted, client text kept on one line (security/redact.py).
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    """The lowest level logged (at start, and on a reload that changes ``logging.level``)."""
    logging.getLogger().setLevel(level.upper())
    # aiohttp's access log is noisy on a busy box; it follows the debug level only.
    logging.getLogger("aiohttp.access").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING
    )


def _stderr_is_journal() -> bool:
    """True when stderr is the journald stream systemd connected (``$JOURNAL_STREAM`` is
    ``device:inode`` of it; a child whose stderr was redirected inherits the variable)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


class _JournalFormatter(SafeFormatter):
    """Prefixes sd-daemon(3) priorities, which journald strips and stores as PRIORITY."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.CRITICAL:
            priority = 2
        elif record.levelno >= logging.ERROR:
            priority = 3
        elif record.levelno >= logging.WARNING:
            priority = 4
        elif record.levelno >= logging.INFO:
            priority = 6
        else:
            priority = 7
        return f"<{priority}>{super().format(record)}"
