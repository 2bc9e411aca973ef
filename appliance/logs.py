"""Logging set-up: plain lines for journald, timestamps only on a terminal or file."""

from __future__ import annotations

import logging
import os
import sys


def setup(level: str) -> None:
    """Configure the root logger once. Under systemd (``$JOURNAL_STREAM``) journald adds the
    timestamp itself, so lines carry none of their own."""
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log is noisy on a busy box; it follows the debug level only.
    logging.getLogger("aiohttp.access").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING
    )
