"""Rollouts as the hub carries them out: created, moved along wave by wave, halted,
rolled back; what each device is asked to do, signed; what devices report.

One :class:`Rollouts` serves the REST API, the CLI and the :class:`RolloutEngine` unit.
Every decision is made from the database alone, so a restarted hub carries on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.hub.config import HubConfig, state_path
from appliance.hub.rollout import plan
from appliance.hub.rollout.artifacts import BlobStore
from appliance.hub.rollout.plan import PlanError
from appliance.hub.storage.base import Device
from appliance.hub.storage.rollouts import Artifact, Rollout, RolloutDevice, RolloutStore
from appliance.ops.units import Periodic
from appliance.security import signing

log = logging.getLogger(__name__)


class NotFound(LookupError):
    """No such rollout or artifact (404)."""


class Rollouts:
    """The rollout logic over one store, blob directory and signing key."""

    def __init__(
        self, store: RolloutStore, devices: Any, blobs: BlobStore, key: Ed25519PrivateKey
    ) -> None:
        self.store = store
        self._devices = devices  # the fleet Storage: devices() for status and targets
        self.blobs = blobs
        self.key = key
        self.public_key = signing.public_text(key)

    async def devices(self) -> list[Device]:
        found: list[Device] = await self._devices.devices()
        return found

    # -- operator ---------------------------------------------------------------------

    async def find_artifact(self, ref: str) -> Artifact:
        found = await self.store.artifact(ref)
        if found is None and ":" in ref:
            name, _, version = ref.rpartition(":")
            found = next(
                (a for a in await self.store.artifacts() if (a.name, a.version) == (name, version)),
                None,
            )
        if found is None:
            raise NotFound(f"no artifact {ref!r}; publish it with `appliance hub publish`")
        return found

    async def create(self, data: Any, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        req = plan.parse_request(data)
        artifact = await self.find_artifact(req.artifact)
        fleet: list[Device] = await self._devices.devices()
        active = [d.id for d in fleet if d.revoked is None]
        if req.target.all:
            chosen = active
        elif req.target.devices:
            unknown = sorted(set(req.target.devices) - set(active))
            if unknown:
                raise PlanError(f"target.devices: not enrolled (or revoked): {', '.join(unknown)}")
            chosen = list(dict.fromkeys(req.target.devices))
        else:
            tags = await self.store.tags()
            chosen = [d for d in active if req.target.tag in tags.get(d, [])]
        if not chosen:
            raise PlanError("target: no enrolled device matches")
        for other in await self.store.rollouts(("running",)):
            if other.artifact_id == artifact.id:
                raise PlanError(f"artifact {req.artifact!r} is already rolling out as {other.id}")
        waves, assigned = plan.assign_waves(req.waves, chosen)
        rollout = plan.new_rollout(req, artifact.id, waves, now)
        versions = {d.id: _serving(d, artifact.name) for d in fleet}
        await self.store.create_rollout(
            rollout, [(d, assigned[d], versions.get(d, "")) for d in chosen]
        )
        log.info(
            "rollout %s of %s %s to %d device(s) in %d wave(s)",
            rollout.id,
            artifact.name,
            artifact.version,
            len(chosen),
            len(waves),
        )
        await self.advance(rollout.id, now)
        return await self.status(rollout.id)

    async def status(self, rollout_id: str) -> dict[str, Any]:
        rollout = await self._get(rollout_id)
        devices = await self.store.rollout_devices(rollout_id)
        fleet = {d.id: d.status() for d in await self._devices.devices()}
        artifact = await self.store.artifact(rollout.artifact_id)
        return plan.status(rollout, devices, artifact, fleet)

    async def halt(self, rollout_id: str, reason: str = "halted by an operator") -> dict[str, Any]:
        rollout = await self._get(rollout_id)
        if rollout.state != "running":
            raise PlanError(f"rollout {rollout_id} is {rollout.state}, not running")
        await self.store.set_rollout(
            rollout_id,
            time.time(),
            state="halted",
            wave=rollout.wave,
            reason=reason,
            started=rollout.wave_started,
        )
        return await self.status(rollout_id)

    async def resume(self, rollout_id: str) -> dict[str, Any]:
        rollout = await self._get(rollout_id)
        devices = await self.store.rollout_devices(rollout_id)
        if rollout.state != "halted" or any(d.state == "rolling_back" for d in devices):
            raise PlanError(f"rollout {rollout_id} is {rollout.state}; only a halt can resume")
        await self.store.set_rollout(
            rollout_id,
            time.time(),
            state="running",
            wave=rollout.wave,
            reason="",
            started=time.time(),
        )
        return await self.status(rollout_id)

    async def rollback(self, rollout_id: str, reason: str = "rolled back by an operator") -> Any:
        rollout = await self._get(rollout_id)
        if rollout.state == "rolled_back":
            raise PlanError(f"rollout {rollout_id} is rolled back already")
        await self._roll_back(rollout, await self.store.rollout_devices(rollout_id), reason)
        await self.advance(rollout_id)
        return await self.status(rollout_id)

    async def _get(self, rollout_id: str) -> Rollout:
        rollout = await self.store.rollout(rollout_id)
        if rollout is None:
            raise NotFound(f"no rollout {rollout_id!r}")
        return rollout

    async def _roll_back(self, rollout: Rollout, devices: list[RolloutDevice], why: str) -> None:
        now = time.time()
        moving = 0
        for d in devices:
            if d.state in plan.ROLL_BACK_FROM:
                await self.store.set_device(rollout.id, d.device_id, "rolling_back", why, now)
                moving += 1
            elif d.state in ("pending", "skipped"):
                await self.store.set_device(rollout.id, d.device_id, "cancelled", why, now)
        # Halted until every device that moved reports it rolled back (see advance).
        state = "halted" if moving else "rolled_back"
        await self.store.set_rollout(
            rollout.id, now, state=state, wave=rollout.wave, reason=why, started=now
        )
        log.warning("rollout %s halted, rolling back: %s", rollout.id, why)

    # -- moving along -----------------------------------------------------------------

    async def advance_all(self) -> None:
        for rollout in await self.store.rollouts(("running", "halted", "done")):
            if rollout.state != "done" or rollout.offline == "catch-up":
                await self.advance(rollout.id)

    async def advance(self, rollout_id: str, now: float | None = None) -> None:
        """One step of the rules; called every ``rollout.interval`` and on each report."""
        now = time.time() if now is None else now
        rollout = await self._get(rollout_id)
        devices = await self.store.rollout_devices(rollout_id)
        if rollout.state == "halted":
            if not any(d.state == "rolling_back" for d in devices) and any(
                d.state == "rolled_back" for d in devices
            ):
                await self.store.set_rollout(
                    rollout.id,
                    now,
                    state="rolled_back",
                    wave=rollout.wave,
                    reason=rollout.reason,
                    started=rollout.wave_started,
                )
            return
        status: dict[str, str] = {}
        if rollout.offline != "wait" and any(
            d.state in ("pending", "wanted", "skipped") for d in devices
        ):
            # Only the skip and catch-up rules ask who is online: reading the whole fleet
            # (each device's latest heartbeat) on every report made a wave cost the square
            # of its size.
            status = {d.id: d.status() for d in await self._devices.devices()}
        if rollout.offline == "catch-up" and rollout.state in ("running", "done"):
            for d in devices:  # skipped while away, back now: installed after all
                if d.state == "skipped" and status.get(d.device_id) not in plan.AWAY:
                    await self.store.set_device(
                        rollout.id, d.device_id, "wanted", "back online: catching up", now
                    )
        if rollout.state != "running":
            return
        failed = plan.failures(devices)
        if len(failed) > rollout.max_failures:
            why = "; ".join(f"{d.device_id}: {d.reason}" for d in failed)[:1000]
            await self._roll_back(rollout, devices, f"{len(failed)} device(s) failed: {why}")
            return
        current = [d for d in devices if d.wave <= rollout.wave]
        pending = []
        for d in current:
            # Decided when the device's wave starts (and while it runs), never before.
            away = status.get(d.device_id) in plan.AWAY
            if rollout.offline != "wait" and away and d.state in ("pending", "wanted"):
                why = f"device {status.get(d.device_id)} when wave {d.wave + 1} ran"
                if rollout.offline == "catch-up":
                    why += "; installed once it is back"
                await self.store.set_device(rollout.id, d.device_id, "skipped", why, now)
            elif d.state == "pending":
                pending.append(d.device_id)
        # A wave's devices in one transaction: one each let every report that came in
        # meanwhile start the same wave over, device by device.
        await self.store.set_devices(rollout.id, pending, "wanted", now, only_from=("pending",))
        devices = await self.store.rollout_devices(rollout_id)
        current = [d for d in devices if d.wave <= rollout.wave]
        settled = [d for d in current if d.state in plan.SETTLED]
        if len(settled) < len(current):
            return
        healthy = [d.healthy_at for d in current if d.healthy_at is not None]
        if healthy and now - max(healthy) < rollout.soak:
            return  # soaking
        last = rollout.wave + 1 >= len(rollout.waves)
        await self.store.set_rollout(
            rollout.id,
            now,
            state="done" if last else "running",
            wave=rollout.wave if last else rollout.wave + 1,
            reason="",
            started=now,
        )
        log.info(
            "rollout %s: wave %d of %d done%s",
            rollout.id,
            rollout.wave + 1,
            len(rollout.waves),
            "; rollout done" if last else "",
        )
        if not last:
            await self.advance(rollout_id, now)

    # -- devices ----------------------------------------------------------------------

    async def wanted(self, device_id: str) -> dict[str, Any] | None:
        """The signed statement of what ``device_id`` should do now, if anything."""
        newer: set[tuple[str, str]] = set()  # (kind, name) of rollouts newer than this one
        for rollout, d in await self.store.device_rollouts(device_id):
            artifact = await self.store.artifact(rollout.artifact_id)
            if artifact is None:
                continue
            what = (artifact.kind, artifact.name)
            if rollout.state == "done" and what in newer:
                continue  # a catch-up a newer rollout of the same thing overtook
            newer.add(what)
            base = {
                "rollout": rollout.id,
                "device": device_id,
                "kind": artifact.kind,
                "name": artifact.name,
                "version": artifact.version,
            }
            if d.state == "rolling_back":
                return signing.sign(self.key, {**base, "action": "rollback"})
            going = rollout.state == "running" or (
                rollout.state == "done" and rollout.offline == "catch-up"
            )
            if going and d.state in ("wanted", "downloading", "installed", "no_traffic"):
                statement = {
                    **base,
                    "action": "install",
                    "artifact": artifact.id,
                    "kind": artifact.kind,
                    "files": artifact.files,
                    "size": artifact.size,
                    "soak": rollout.soak,
                }
                return signing.sign(self.key, statement)
        return None

    async def report(self, device_id: str, body: dict[str, Any]) -> None:
        """A device's progress report (an outbox record of kind ``rollout``)."""
        rollout_id, state = body.get("rollout"), body.get("state")
        if not isinstance(rollout_id, str) or state not in plan.REPORTS:
            return
        reason = str(body.get("reason") or "")[:500]
        changed = await self.store.set_device(
            rollout_id, device_id, str(state), reason, time.time(), only_from=plan.REPORTS[state]
        )
        if changed:
            log.info("rollout %s: %s is %s %s", rollout_id, device_id, state, reason)
            with contextlib.suppress(NotFound):
                await self.advance(rollout_id)


ROLLOUTS = web.AppKey("rollouts", Rollouts)


def _serving(device: Device, name: str) -> str:
    latest = device.latest or {}
    models = latest.get("models") if isinstance(latest.get("models"), dict) else {}
    entry = models.get(name) if isinstance(models, dict) else None
    version = entry.get("version") if isinstance(entry, dict) else None
    return str(version) if version else ""


class RolloutEngine(Periodic):
    """Lifecycle unit: moves running rollouts along every ``interval`` seconds."""

    name = "appliance-hub-rollouts"

    def __init__(self, rollouts: Rollouts, interval: float) -> None:
        super().__init__(interval)
        self._rollouts = rollouts

    async def tick(self) -> None:
        await self._rollouts.advance_all()


def open_rollouts(store: Any, config: HubConfig) -> Rollouts:
    """Blocking (reads or makes the signing key): call off the event loop."""
    section = config.rollout
    root = section.dir or state_path(config, "artifacts")
    key_file = section.signing_key_file or state_path(config, signing.KEY_FILE)
    return Rollouts(store, store, BlobStore(root), signing.load_or_create(key_file))
