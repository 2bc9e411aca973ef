"""What an operator asks for (target, waves, soak, failure budget), validated, and the
rules that move a rollout along.

Waves are cumulative: ``["1", "25%", "100%"]`` is one device, then up to a quarter of
the targets, then all. Each wave must hold at least one device more than the last; a
plan that stops short of all targets gets a last wave of everything.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.hub.storage.rollouts import MOVED, Rollout, RolloutDevice

_DEVICE_ID = r"^[a-z0-9][a-z0-9-]{0,62}$"
_TAG = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_WAVE = re.compile(r"^(?:(\d{1,6})|(\d{1,3}(?:\.\d+)?)%)$")

# What a device's report may move it to, from which states. ``no_traffic``: installed, its
# canary armed but without the requests to judge; settled for the wave (docs/hub.md), and
# still moved on to healthy or failed by the canary's verdict when traffic comes.
REPORTS: dict[str, tuple[str, ...]] = {
    "downloading": ("wanted",),
    "installed": ("wanted", "downloading"),
    "no_traffic": ("wanted", "downloading", "installed"),
    "healthy": ("wanted", "downloading", "installed", "no_traffic"),
    "failed": ("wanted", "downloading", "installed", "healthy", "no_traffic"),
    "rolled_back": (
        "rolling_back",
        "wanted",
        "downloading",
        "installed",
        "healthy",
        "no_traffic",
    ),
}
ROLL_BACK_FROM = ("wanted", "downloading", "installed", "healthy", "no_traffic")
# A wave is over once each of its devices is in one of these (and the soak has passed).
SETTLED = ("healthy", "no_traffic", "skipped", "failed")
# Devices that count as away for ``offline``.
AWAY = ("offline", "never seen", "revoked", None)


class PlanError(ValueError):
    """A rollout request that cannot be carried out; the message names the field."""


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")

    all: bool = False
    devices: list[str] = Field(default_factory=list, max_length=100_000)
    tag: str | None = Field(default=None, pattern=_TAG)

    @model_validator(mode="after")
    def _one(self) -> Target:
        chosen = sum([self.all, bool(self.devices), self.tag is not None])
        if chosen != 1:
            raise ValueError("name exactly one of all, devices or tag")
        for device in self.devices:
            if not re.fullmatch(_DEVICE_ID, device):
                raise ValueError(f"{device!r} is not a device id")
        return self


class RolloutRequest(BaseModel):
    """``POST /api/v1/rollouts`` and ``appliance hub rollout start``."""

    model_config = ConfigDict(extra="forbid")

    artifact: str = Field(min_length=1, max_length=128, description="id, or name:version")
    target: Target
    waves: list[str] = Field(default_factory=lambda: ["100%"], min_length=1, max_length=20)
    soak: float = Field(default=60.0, ge=0, le=7 * 86_400, allow_inf_nan=False)
    max_failures: int = Field(default=0, ge=0, le=100_000)
    # wait: a wave waits for its offline devices; skip: they are skipped when their wave
    # starts; catch-up: skipped too, and installed whenever they come back.
    offline: Literal["wait", "skip", "catch-up"] = "wait"

    @model_validator(mode="after")
    def _waves(self) -> RolloutRequest:
        for wave in self.waves:
            match = _WAVE.fullmatch(wave.strip())
            if not match or (match.group(2) and not 0 < float(match.group(2)) <= 100):
                raise ValueError(f"wave {wave!r}: a device count (2) or a percentage (25%)")
            if match.group(1) and int(match.group(1)) < 1:
                raise ValueError(f"wave {wave!r}: at least one device")
        return self


def parse_request(data: Any) -> RolloutRequest:
    try:
        return RolloutRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise PlanError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None


def assign_waves(waves: list[str], devices: list[str]) -> tuple[list[str], dict[str, int]]:
    """The effective waves and each device's wave (0-based), in device order."""
    total = len(devices)
    bounds: list[int] = []
    kept: list[str] = []
    for wave in waves:
        match = _WAVE.fullmatch(wave.strip())
        assert match is not None
        if match.group(1):
            upto = min(total, int(match.group(1)))
        else:
            upto = min(total, max(1, math.ceil(total * float(match.group(2)) / 100)))
        if bounds and upto <= bounds[-1]:
            continue  # adds nobody (a small fleet): skip it
        bounds.append(upto)
        kept.append(wave.strip())
    if not bounds or bounds[-1] < total:
        bounds.append(total)
        kept.append("100%")
    out: dict[str, int] = {}
    start = 0
    for index, upto in enumerate(bounds):
        for device in devices[start:upto]:
            out[device] = index
        start = upto
    return kept, out


def new_rollout(req: RolloutRequest, artifact_id: str, waves: list[str], now: float) -> Rollout:
    return Rollout(
        id="r-" + secrets.token_hex(6),
        artifact_id=artifact_id,
        target=req.target.model_dump(exclude_defaults=True),
        waves=waves,
        soak=req.soak,
        max_failures=req.max_failures,
        offline=req.offline,
        state="running",
        wave=0,
        wave_started=now,
        reason="",
        created=now,
        updated=now,
    )


def status(
    rollout: Rollout,
    devices: list[RolloutDevice],
    artifact: Any,
    fleet: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The document of ``rollout status --json`` and ``GET /api/v1/rollouts/{id}``;
    ``fleet``: each device's fleet status, to say what the offline choice will do."""
    fleet = fleet or {}
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.state] = counts.get(d.state, 0) + 1
    waves = []
    for index, wave in enumerate(rollout.waves):
        members = [d for d in devices if d.wave == index]
        waves.append(
            {
                "index": index,
                "wave": wave,
                "devices": [d.device_id for d in members],
                "healthy": sum(1 for d in members if d.state == "healthy"),
                "state": (
                    "done"
                    if index < rollout.wave or rollout.state == "done"
                    else "running"
                    if index == rollout.wave and rollout.state == "running"
                    else "waiting"
                    if index > rollout.wave
                    else rollout.state
                ),
            }
        )
    return {
        **rollout.to_dict(),
        "artifact": artifact.to_dict() if artifact is not None else None,
        "counts": counts,
        "waves": waves,
        "wave_count": len(rollout.waves),
        "devices": [_explained(rollout, d, fleet.get(d.device_id)) for d in devices],
        "now": time.time(),
    }


def _explained(rollout: Rollout, d: RolloutDevice, seen: str | None) -> dict[str, Any]:
    """A device's row; a pending one that is away says what its wave's start will do."""
    row = d.to_dict()
    if d.state == "pending" and not d.reason and seen in AWAY and rollout.state == "running":
        fate = {
            "wait": "its wave will wait for it",
            "skip": "it will be skipped",
            "catch-up": "it will be skipped, and installed once it is back",
        }[rollout.offline]
        row["reason"] = (
            f"{seen or 'unknown'} now; if still away when wave {d.wave + 1} starts, {fate}"
        )
    return row


def failures(devices: list[RolloutDevice]) -> list[RolloutDevice]:
    return [d for d in devices if d.state == "failed"]


def moved(devices: list[RolloutDevice]) -> list[RolloutDevice]:
    return [d for d in devices if d.state in MOVED]
