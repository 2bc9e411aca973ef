"""Configuration fragments from the hub, applied on the device and judged.

An ``install`` of a ``config`` artifact downloads its one file (``fragment.toml``), checks
that it names only keys that may change remotely and that this device's configuration
loader accepts it (:func:`appliance.config.validate_fragment`), and only then writes it,
atomically, as the drop-in ``<state directory>/remote-config.toml`` (the operator's
``appliance.toml`` is never touched; the drop-in is read at every start). The daemon then
reloads the way SIGHUP does; alert rules and the log level change at once, the other
sections at the next start (``appliance.config.remote.LIVE``).

The change is judged over the rollout's soak: the reload must succeed, every model the
fragment names (a stream rule's, a pinned version's) must be served here, and no model may
fail that did not fail before. On failure the previous drop-in (or none) is put back, the
daemon reloads again and ``failed`` is reported with the reason. A daemon that stops while
judging reads the new drop-in at start and judges it again when the hub asks once more.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from appliance.config import Config, validate_fragment
from appliance.config.remote import DROPIN_NAME, LIVE, parse
from appliance.core.service import Core
from appliance.core.types import ModelState
from appliance.errors import ConfigError
from appliance.ops.update_files import Refused, checked_files, load_state, save_state
from appliance.ops.update_files import write_atomically as write

log = logging.getLogger(__name__)

FRAGMENT = "fragment.toml"
MAX_SOAK = 600.0
# What the server's reload gives back: the problems of the steps that failed.
Reload = Callable[[], Awaitable[list[str]]]
Fetch = Callable[[Path, dict[str, Any]], Awaitable[None]]


class ConfigUpdate:
    """The drop-in of one daemon: applied, judged, put back."""

    def __init__(
        self,
        state_dir: Path,
        core: Core,
        reload: Reload,
        current: Callable[[], Config],
        report: Callable[[dict[str, Any]], None],
    ) -> None:
        self.dropin = state_dir / DROPIN_NAME
        self._meta = state_dir / "remote-config.json"
        self._stage = state_dir / ".incoming-config"
        self._core = core
        self._reload = reload
        self._current = current
        self._report = report
        # What /health shows, kept in memory so a health request reads no file.
        self._shown = _shown(load_state(self._meta), self.dropin.exists())

    async def apply(self, st: dict[str, Any], fetch: Fetch) -> tuple[str, str]:
        rollout = str(st["rollout"])
        files = checked_files(st)
        if len(files) != 1 or files[0]["path"] != FRAGMENT:
            raise Refused(f"a configuration artifact is one {FRAGMENT}")
        meta = await asyncio.to_thread(load_state, self._meta)
        failed_before = self._failed()
        if meta.get("rollout") == rollout and self.dropin.exists():
            # Applied before the daemon stopped: judged again from the start.
            fragment = self._parse(await asyncio.to_thread(self.dropin.read_text, "utf-8"))
        else:
            self._report({"rollout": rollout, "state": "downloading", "reason": ""})
            stage = self._stage / rollout
            await fetch(stage, files[0])
            text = await asyncio.to_thread((stage / FRAGMENT).read_text, "utf-8")
            fragment = self._parse(text)
            previous = await asyncio.to_thread(_read_or_none, self.dropin)
            meta = {
                "rollout": rollout,
                "name": st.get("name"),
                "version": st.get("version"),
                "previous": previous,
                "previous_rollout": meta.get("rollout"),
            }
            await asyncio.to_thread(save_state, self._meta, meta)
            await asyncio.to_thread(write, self.dropin, text.encode())
            self._shown = _shown(meta, True)
            await asyncio.to_thread(shutil.rmtree, self._stage, True)
            log.info("rollout %s: configuration fragment written to %s", rollout, self.dropin)
        self._report({"rollout": rollout, "state": "installed", "reason": ""})
        problems = await self._reload()
        problem = "; ".join(problems) or self._check(fragment, failed_before)
        soak = st.get("soak")
        soak = float(soak) if isinstance(soak, int | float) else 0.0
        until = time.monotonic() + min(MAX_SOAK, soak)
        while not problem and time.monotonic() < until:
            await asyncio.sleep(min(0.5, max(0.0, until - time.monotonic())))
            problem = self._check(fragment, failed_before)
        if problem:
            log.error("rollout %s: configuration rolled back: %s", rollout, problem)
            await self._put_back(meta)
            return "failed", f"configuration rolled back: {problem}"
        later = [s for s in sorted(fragment) if s not in LIVE]
        why = f"applied [{'], ['.join(sorted(fragment))}]"
        if later:
            why += f"; [{'], ['.join(later)}] take effect at the next start"
        return "healthy", why

    async def revert(self, rollout: str) -> str:
        """The hub's rollback: the drop-in before this rollout's, if this one's is on."""
        meta = await asyncio.to_thread(load_state, self._meta)
        if meta.get("rollout") != rollout:
            return "was not applied"
        await self._put_back(meta)
        return "rolled back on the hub's order"

    def status(self) -> dict[str, Any]:
        """The "remote_config" unit of /health: the drop-in, and what is in effect."""
        config = self._current()
        dropin = str(self.dropin) if self._shown is not None else None
        return {
            "dropin": dropin,
            "rollout": self._shown.get("rollout") if self._shown is not None else None,
            "version": self._shown.get("version") if self._shown is not None else None,
            "effective": {s: getattr(config, s).model_dump(mode="json") for s in LIVE},
        }

    # -- judging ----------------------------------------------------------------------

    def _parse(self, text: str) -> dict[str, dict[str, Any]]:
        try:  # refused again here: the device trusts no hub with its keys or addresses
            return validate_fragment(parse(text, origin=FRAGMENT), origin=FRAGMENT)
        except ConfigError as exc:
            raise Refused(str(exc)) from None

    def _failed(self) -> set[str]:
        return {
            h.name for h in self._core.list_models(pipelines=False) if h.state is ModelState.FAILED
        }

    def _check(self, fragment: dict[str, dict[str, Any]], failed_before: set[str]) -> str:
        served = {h.name for h in self._core.list_models()}
        for rule in fragment.get("mqtt", {}).get("rules", []):
            model = rule.get("model") if isinstance(rule, dict) else None
            if model is not None and model not in served:
                return f"mqtt rule {rule.get('name')!r} names model {model!r}, not served here"
        for entry in fragment.get("models", {}).get("versions", []):
            name = str(entry).partition(":")[0]
            if name not in served:
                return f"models.versions names model {name!r}, not served here"
        newly = sorted(self._failed() - failed_before)
        if newly:
            return f"model(s) failed after the change: {', '.join(newly)}"
        return ""

    async def _put_back(self, meta: dict[str, Any]) -> None:
        previous = meta.get("previous")
        if isinstance(previous, str):
            await asyncio.to_thread(write, self.dropin, previous.encode())
        else:
            await asyncio.to_thread(self.dropin.unlink, True)
        back = {"rollout": meta.get("previous_rollout"), "previous": None}
        await asyncio.to_thread(save_state, self._meta, back)
        self._shown = _shown(back, isinstance(previous, str))
        problems = await self._reload()
        if problems:
            log.error("reloading the previous configuration: %s", "; ".join(problems))


def _shown(meta: dict[str, Any], on: bool) -> dict[str, Any] | None:
    """The drop-in's rollout and version for /health; None when no drop-in is on."""
    return {"rollout": meta.get("rollout"), "version": meta.get("version")} if on else None


def _read_or_none(path: Path) -> str | None:
    return path.read_text("utf-8") if path.exists() else None


__all__ = ["ConfigUpdate", "Fetch", "Reload"]
