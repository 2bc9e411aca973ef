"""Transports: translate a wire protocol to calls on the core and back. They never import a
runtime."""

from __future__ import annotations
