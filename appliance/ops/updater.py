"""Model rollouts on the device: what the hub asks for, checked, fetched, installed beside
the serving version, judged by the canary, and reported.

The hub's ingest answer may carry ``wanted``: a statement signed with the hub's Ed25519
key (``hub.public_key``) naming this device, a rollout and an action. Nothing unsigned,
signed by another key, or naming another device is acted on; such a statement is reported
as refused and nothing on disk changes.

``install`` downloads each file of the model version into
``<models.dir>/.incoming/<rollout>/v/`` (resuming a cut download with HTTP Range), checks
its size and sha256, and only then renames the whole directory to
``<models.dir>/<name>/<version>`` (fsynced files, directories and rename): after power
loss at any moment the repository holds the old version, or the old and the new, never a
half-written one. A download that would leave less than ``hub.update_margin_bytes`` free
is refused before it starts. The repository is then re-read; with canary releases on, the
canary's verdict decides (promoted: ``healthy``; rolled back: the version is moved aside
and ``failed`` reported with the canary's reason); without, a version that loads is
``healthy``. ``rollback`` moves the version aside and re-reads the repository, so the
previous version serves again. Reports go to the hub through the outbox (kind
``rollout``).

A canary that after ``max(canary.window, soak)`` has too few requests to judge and no
error is reported ``no_traffic`` (the rollout counts it as settled, see docs/hub.md) and
stays armed: the first real traffic still promotes or rolls it back, and that is
reported too. Before the reload that serves a new version the install is recorded as
pending; a daemon killed before the verdict finds it at start (:func:`recover`), moves
the version back to staging so that it never serves unjudged, and installs it again,
canary and all, when the hub next asks (nothing is downloaded twice).

Artifacts of kind ``config`` (configuration fragments) are applied by
:class:`~appliance.ops.config_update.ConfigUpdate`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from appliance.config import Config
from appliance.core.canary import CanaryDecision
from appliance.core.repository import MANIFEST, valid_name
from appliance.core.service import Core
from appliance.core.types import ModelState
from appliance.ops.config_update import ConfigUpdate, Reload
from appliance.ops.update_files import (
    VERSION,
    Refused,
    checked_model,
    fsync_dir,
    load_state,
    matches,
    publish,
    save_state,
    sync,
    unpublish,
    verified,
)
from appliance.security import signing

log = logging.getLogger(__name__)

BLOB_PATH = "/api/v1/artifacts/blobs/"
INCOMING = ".incoming"

Report = Callable[[dict[str, Any]], None]


def recover(config: Config, state_file: Path) -> str | None:
    """At start, before the repository is read: an install the daemon did not live to see
    judged goes back to staging. Blocking; returns what was set aside."""
    pending = load_state(state_file).get("pending")
    root = config.models.dir
    if not isinstance(pending, dict) or root is None:
        return None
    name, version = str(pending.get("name", "")), str(pending.get("version", ""))
    rollout = str(pending.get("rollout", ""))
    if not valid_name(name) or not VERSION.fullmatch(version) or not rollout:
        return None
    target = root / name / version
    if not target.is_dir():
        return None
    unpublish(target, root / INCOMING / rollout / "v")
    log.warning(
        "model %s version %s was installed but not judged before the daemon stopped: set "
        "aside until rollout %s installs it again with its canary",
        name,
        version,
        rollout,
    )
    return f"{name}:{version}"


class Updater:
    """Carries out the hub's signed rollout statements, one at a time."""

    def __init__(
        self,
        config: Config,
        core: Core,
        report: Report,
        session: Callable[[], aiohttp.ClientSession | None],
        state_file: Path,
        *,
        reload: Reload | None = None,
        current: Callable[[], Config] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self._config = config
        self._core = core
        self._report = report
        self._session = session
        self._key = signing.parse_public(config.hub.public_key)
        self._state_file = state_file
        state = load_state(state_file)
        self._done: set[str] = set(state.get("done", []))
        self._pending: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._rollout = ""  # the rollout the running task carries out
        self._decisions: dict[tuple[str, str], asyncio.Future[CanaryDecision]] = {}
        self._saving = threading.Lock()
        self._saves: set[asyncio.Future[None]] = set()
        self._unsubscribe = [core.add_canary_listener(self._on_decision)]
        self.configs: ConfigUpdate | None = None
        if reload is not None:
            self.configs = ConfigUpdate(
                state_dir or state_file.parent, core, reload, current or (lambda: config), report
            )
            self._unsubscribe.append(core.add_status("remote_config", self.configs.status))

    async def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def offer(self, signed: Any) -> None:
        """What an ingest answer said is wanted (None: nothing)."""
        if signed is None:
            return
        unverified = signed.get("statement") if isinstance(signed, dict) else None
        rollout = str(unverified.get("rollout", "")) if isinstance(unverified, dict) else ""
        try:
            statement = signing.verify(self._key, signed)
            if statement.get("device") != self._config.device.id:
                raise signing.SignatureError(
                    f"the statement is for device {statement.get('device')!r}"
                )
        except signing.SignatureError as exc:
            key = f"{rollout}:refused"
            if key not in self._done:
                log.error("rollout %s refused: %s", rollout, exc)
                self._finish(key, rollout, "failed", f"refused: {exc}")
            return
        key = f"{statement['rollout']}:{statement.get('action')}"
        if key in self._done:
            return
        running = self._task
        if running is not None and not running.done():
            # Busy (a canary judging, say): only a rollback of that rollout cuts in.
            if statement.get("action") != "rollback" or statement["rollout"] != self._rollout:
                return
            running.cancel()
        self._rollout = str(statement["rollout"])
        self._task = asyncio.create_task(
            self._carry_out(key, statement, running), name="appliance-update"
        )

    async def _carry_out(
        self, key: str, statement: dict[str, Any], before: asyncio.Task[None] | None = None
    ) -> None:
        if before is not None:
            await asyncio.gather(before, return_exceptions=True)
        rollout = str(statement["rollout"])
        kind = statement.get("kind", "model")
        try:
            if kind == "config":
                if self.configs is None:
                    raise Refused("this device takes no configuration from the hub")
                if statement.get("action") == "rollback":
                    state, why = "rolled_back", await self.configs.revert(rollout)
                elif statement.get("action") == "install":
                    state, why = await self.configs.apply(statement, self._fetch)
                else:
                    raise Refused(f"unknown action {statement.get('action')!r}")
                await self._finish(key, rollout, state, why)
            elif kind != "model":
                raise Refused(f"unknown artifact kind {kind!r}")
            elif statement.get("action") == "rollback":
                moved = await asyncio.to_thread(self._move_aside, statement)
                await self._core.reload_models()
                why = "rolled back on the hub's order" if moved else "was not installed"
                await self._finish(key, rollout, "rolled_back", why)
            elif statement.get("action") == "install":
                state, why = await self._install(statement)
                await self._finish(key, rollout, state, why)
            else:
                raise Refused(f"unknown action {statement.get('action')!r}")
        except Refused as exc:
            log.error("rollout %s refused: %s", rollout, exc)
            if self._config.models.dir is not None:  # nothing half-fetched stays behind
                stage = self._config.models.dir / INCOMING / rollout
                await asyncio.to_thread(shutil.rmtree, stage, True)
            await self._finish(key, rollout, "failed", f"refused: {exc}")
        except (OSError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # Not final: the hub asks again and the download resumes where it stopped.
            log.warning("rollout %s: %s; trying again on the next answer", rollout, exc)
            await asyncio.sleep(1)

    def _finish(self, key: str, rollout: str, state: str, reason: str) -> asyncio.Future[None]:
        """Report and remember the outcome; the state file is written off the loop."""
        self._report({"rollout": rollout, "state": state, "reason": reason})
        self._done.add(key)
        if self._pending is not None and self._pending.get("rollout") == rollout:
            self._pending = None
        saving = asyncio.ensure_future(asyncio.to_thread(self._save))
        self._saves.add(saving)  # held until written, also when nobody awaits it
        saving.add_done_callback(self._saves.discard)
        return saving

    def _save(self) -> None:
        state: dict[str, Any] = {"done": sorted(self._done)}
        if self._pending is not None:
            state["pending"] = self._pending
        with self._saving:  # one writer of the state file at a time
            save_state(self._state_file, state)

    # -- install ----------------------------------------------------------------------

    def _models_dir(self) -> Path:
        directory = self._config.models.dir
        if directory is None:
            raise Refused("this device has no models.dir to install into")
        return directory

    async def _install(self, st: dict[str, Any]) -> tuple[str, str]:
        name, version, files = checked_model(st)
        root = self._models_dir()
        target = root / name / version
        stage = root / INCOMING / str(st["rollout"]) / "v"
        # Recorded before the version can serve: a daemon killed before the verdict sets it
        # aside at its next start (recover) instead of serving it unjudged.
        self._pending = {"rollout": str(st["rollout"]), "name": name, "version": version}
        await asyncio.to_thread(self._save)
        if not await asyncio.to_thread(verified, target, files):
            await asyncio.to_thread(self._check_room, root, stage, files, name, target)
            self._report({"rollout": st["rollout"], "state": "downloading", "reason": ""})
            for entry in files:
                await self._fetch(stage, entry)
            await asyncio.to_thread(publish, stage, target)
        self._report({"rollout": st["rollout"], "state": "installed", "reason": ""})
        future = asyncio.get_running_loop().create_future()
        self._decisions[(name, version)] = future
        try:
            await self._core.reload_models()
            handle = next((h for h in self._core.versions(name) if h.version == version), None)
            if handle is None or handle.state is ModelState.FAILED:
                error = handle.error if handle is not None else "not served after the reload"
                return await self._undo(st, f"version {version} did not load: {error}")
            if self._core.canary_version(name) == version:
                decision = await self._verdict(st, name, future)
                if decision.decision == "rolled_back":
                    return await self._undo(st, f"canary rolled back: {decision.reason}")
                return "healthy", f"canary promoted: {decision.reason}"
            return "healthy", f"serving {name} {version}"
        finally:
            self._decisions.pop((name, version), None)

    async def _verdict(
        self, st: dict[str, Any], name: str, future: asyncio.Future[CanaryDecision]
    ) -> CanaryDecision:
        """The canary's decision; reported ``no_traffic`` meanwhile if it gets none."""
        soak = st.get("soak")
        wait = max(self._config.canary.window, float(soak) if isinstance(soak, int | float) else 0)
        try:
            return await asyncio.wait_for(asyncio.shield(future), wait)
        except asyncio.TimeoutError:
            pass
        stats = self._core.canary_stats(name)
        seen, errors = int(stats.get("requests", 0)), int(stats.get("errors", 0))
        if seen < self._config.canary.min_requests and errors == 0:
            self._report(
                {
                    "rollout": st["rollout"],
                    "state": "no_traffic",
                    "reason": f"canary {st['version']} had {seen} of the "
                    f"{self._config.canary.min_requests} requests it needs after {wait:g}s, "
                    "no errors; it keeps running until traffic decides",
                }
            )
        return await future

    async def _undo(self, st: dict[str, Any], why: str) -> tuple[str, str]:
        await asyncio.to_thread(self._move_aside, st)
        await self._core.reload_models()
        return "failed", why

    def _on_decision(self, decision: CanaryDecision) -> None:
        future = self._decisions.get((decision.model, decision.canary))
        if future is not None and not future.done():
            future.set_result(decision)

    def _check_room(
        self, root: Path, stage: Path, files: list[dict[str, Any]], name: str, target: Path
    ) -> None:
        """Blocking: the version can go in beside the others, and the disk has room for it."""
        if (root / name / MANIFEST).exists():
            raise Refused(f"{name} uses the single-version layout; move it into {name}/1/")
        if target.exists():
            raise Refused(f"{target} exists with other content")
        have = 0
        for entry in files:
            for path in (stage / entry["path"], stage / (entry["path"] + ".part")):
                if path.exists():
                    have += path.stat().st_size
        needed = sum(int(f["size"]) for f in files) - have
        fs = os.statvfs(root)
        free = fs.f_bavail * fs.f_frsize
        margin = self._config.hub.update_margin_bytes
        if needed + margin > free:
            raise Refused(
                f"not enough disk space: {needed} bytes needed plus a margin of {margin}, "
                f"{free} free on {root}"
            )

    async def _fetch(self, stage: Path, entry: dict[str, Any]) -> None:
        final, part = stage / entry["path"], stage / (entry["path"] + ".part")
        if await asyncio.to_thread(matches, final, entry):
            return
        await asyncio.to_thread(stage.mkdir, parents=True, exist_ok=True)
        have = await asyncio.to_thread(_size_or_zero, part)
        if have > int(entry["size"]):
            await asyncio.to_thread(part.unlink)
            have = 0
        session = self._session()
        if session is None:
            raise aiohttp.ClientError("the hub session is closed")
        url = self._config.hub.url.rstrip("/") + BLOB_PATH + entry["sha256"]
        headers = {"Range": f"bytes={have}-"} if have else {}
        resumed = have > 0
        if resumed:
            log.info("resuming the download of %s at byte %d", entry["path"], have)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
        async with session.get(url, headers=headers, timeout=timeout) as resp:
            if resp.status == 200:
                have, resumed = 0, False  # the whole file: start again
            elif resp.status != 206 and not (resp.status == 416 and have):
                raise aiohttp.ClientError(f"hub answered {resp.status} for {entry['path']}")
            rate = self._config.hub.update_rate_bytes
            began, got = time.monotonic(), 0
            out = await asyncio.to_thread(part.open, "r+b" if have else "wb")
            try:
                await asyncio.to_thread(out.seek, have)
                if resp.status != 416:
                    async for block in resp.content.iter_chunked(1 << 16):
                        await asyncio.to_thread(out.write, block)
                        got += len(block)
                        if rate and (ahead := got / rate - (time.monotonic() - began)) > 0:
                            await asyncio.sleep(ahead)
                await asyncio.to_thread(sync, out)
            finally:
                await asyncio.to_thread(out.close)
        if not await asyncio.to_thread(matches, part, entry):
            await asyncio.to_thread(part.unlink)
            if resumed:  # what was kept may not have reached the disk: fetch it whole
                raise OSError(f"{entry['path']}: the resumed download did not verify")
            raise Refused(f"{entry['path']} does not match its size and sha256 (tampered?)")
        await asyncio.to_thread(os.replace, part, final)

    def _move_aside(self, st: dict[str, Any]) -> bool:
        name, version = str(st.get("name", "")), str(st.get("version", ""))
        if not valid_name(name) or not VERSION.fullmatch(version):
            raise Refused("the statement names no valid model and version")
        root = self._models_dir()
        target = root / name / version
        if not target.is_dir():
            return False
        aside = root / INCOMING / "rolled-back" / f"{name}-{version}-{int(time.time())}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(target, aside)
        fsync_dir(target.parent)
        log.warning("model %s version %s moved aside to %s", name, version, aside)
        return True


def _size_or_zero(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0
