"""The core: knows models and requests, and nothing about transports.

Transports call :class:`~appliance.core.service.Core`; runtimes sit behind
:class:`~appliance.runtimes.base.Runtime` and are reached only through the core.
"""

from __future__ import annotations
