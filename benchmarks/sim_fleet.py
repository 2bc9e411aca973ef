"""Simulated devices for the fleet-scale rollout benchmark.

These devices are SIMULATED: a thousand real daemons (a Python process of about 100 MiB
each, with its model runtime) cannot run on this two-core machine. Each simulated device
is a small asyncio task with an aiohttp session of its own that speaks the device's side
of the hub protocol as ``appliance/ops/hubsync.py`` and ``appliance/ops/updater.py`` do:

* it uploads outbox records (``POST /api/v1/ingest`` with its own bearer token, the same
  batch fields, sequence numbers on one stream, records deleted once ``acked``): a
  heartbeat every ``interval`` seconds, a progress report as soon as it is made;
* it checks the ``wanted`` statement of each answer with the updater's own code (the
  hub's Ed25519 signature, the device it names, :func:`appliance.ops.updater._checked`
  for the artifact), once per rollout and action;
* it downloads each file from ``/api/v1/artifacts/blobs/<sha256>`` (HTTP Range resumes a
  cut download: a 200 starts again, 206 continues, 416 means already whole), checks size
  and sha256, and reports ``downloading``, ``installed`` and ``healthy`` (``failed`` with
  the reason on a bad signature or a file that does not verify).

What it does not do: write to disk or load the model (the bytes are held and hashed in
memory) and run a canary, so ``installed`` is followed at once by ``healthy``. Every
``cut_every``-th device's first download stops half way, as a dropped link would, and
resumes with a Range request on the next answer, as the real updater does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import secrets
import time
from types import TracebackType
from typing import Any

import aiohttp

from appliance import __version__
from appliance.ops import updater
from appliance.ops.hubsync import INGEST_PATH
from appliance.security import signing


class _Cut(aiohttp.ClientError):
    """A download stopped half way on purpose (a dropped link)."""


class SimDevice:
    """One simulated device: its outbox stream, its uploads and its updater."""

    def __init__(self, fleet: SimFleet, device_id: str, token: str, cut: bool) -> None:
        self.fleet = fleet
        self.id = device_id
        self.token = token
        self.stream = secrets.token_hex(8)
        self.seq = 0
        self.queued: list[dict[str, Any]] = []
        self.appended = asyncio.Event()
        self.done: set[str] = set()
        self.task: asyncio.Task[None] | None = None
        self.held: dict[str, bytearray] = {}  # sha256 -> bytes fetched so far
        self.cut = cut
        self.version = "1"
        self.reported: dict[str, float] = {}  # state -> when this device reported it
        self.uploads = 0
        self.session: aiohttp.ClientSession | None = None

    def put(self, kind: str, body: dict[str, Any]) -> None:
        self.seq += 1
        self.queued.append({"seq": self.seq, "kind": kind, "time": time.time(), "body": body})
        self.appended.set()

    def report(self, rollout: str, state: str, reason: str = "") -> None:
        self.reported.setdefault(state, time.time())
        self.put("rollout", {"rollout": rollout, "state": state, "reason": reason})

    async def run(self) -> None:
        fleet = self.fleet
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=2),
            timeout=aiohttp.ClientTimeout(total=30),
            headers={
                "Authorization": f"Bearer {self.token}",
                "User-Agent": f"appliance/{__version__} (simulated)",
            },
        )
        try:
            # Devices booted at different moments: spread over one interval.
            await asyncio.sleep(random.uniform(0, fleet.interval))
            next_beat = time.monotonic()
            while True:
                if time.monotonic() >= next_beat:
                    next_beat += fleet.interval
                    self.put("heartbeat", fleet.heartbeat())
                if self.queued:
                    await self._upload()
                    continue
                self.appended.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        self.appended.wait(), max(0.0, next_beat - time.monotonic())
                    )
        finally:
            if self.task is not None:
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)
            await self.session.close()

    async def _upload(self) -> None:
        assert self.session is not None
        batch = self.queued[:100]
        payload = {
            "device": self.id,
            "name": self.id,
            "version": __version__,
            "stream": self.stream,
            "dropped": {},
            "records": batch,
        }
        started = time.perf_counter()
        try:
            async with self.session.post(self.fleet.url + INGEST_PATH, json=payload) as resp:
                answer = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self.fleet.errors.append(f"{self.id}: {type(exc).__name__} {exc}")
            await asyncio.sleep(random.uniform(0.5, 1.0))
            return
        self.fleet.latencies.append(time.perf_counter() - started)
        if status != 200:
            self.fleet.errors.append(f"{self.id}: ingest {status} {answer}")
            await asyncio.sleep(random.uniform(0.5, 1.0))
            return
        acked = answer.get("acked")
        self.queued = [r for r in self.queued if not isinstance(acked, int) or r["seq"] > acked]
        self.uploads += 1
        self.offer(answer.get("wanted"))

    # -- the updater's side, as appliance/ops/updater.py does it ------------------------

    def offer(self, signed: Any) -> None:
        if signed is None or (self.task is not None and not self.task.done()):
            return
        unverified = signed.get("statement") if isinstance(signed, dict) else None
        rollout = str(unverified.get("rollout", "")) if isinstance(unverified, dict) else ""
        try:
            statement = signing.verify(self.fleet.key, signed)
            if statement.get("device") != self.id:
                raise signing.SignatureError(f"the statement is for {statement.get('device')!r}")
        except signing.SignatureError as exc:
            if f"{rollout}:refused" not in self.done:
                self.done.add(f"{rollout}:refused")
                self.report(rollout, "failed", f"refused: {exc}")
            return
        key = f"{statement['rollout']}:{statement.get('action')}"
        if key not in self.done:
            self.task = asyncio.create_task(self._carry_out(key, statement), name=f"sim-{self.id}")

    async def _carry_out(self, key: str, statement: dict[str, Any]) -> None:
        rollout = str(statement["rollout"])
        try:
            if statement.get("action") == "rollback":
                self.version = "1"
                self._finish(key, rollout, "rolled_back", "rolled back on the hub's order")
            elif statement.get("action") == "install":
                name, version, files = updater._checked(statement)
                self.report(rollout, "downloading")
                for entry in files:
                    await self._fetch(entry)
                self.report(rollout, "installed")
                self.version = version
                # Simulated: no model to load and no canary to wait for.
                self._finish(key, rollout, "healthy", f"serving {name} {version} (simulated)")
            else:
                raise updater.Refused(f"unknown action {statement.get('action')!r}")
        except updater.Refused as exc:
            self._finish(key, rollout, "failed", f"refused: {exc}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # Not final: the next answer asks again and the download resumes.
            self.fleet.retries += 1
            if not isinstance(exc, _Cut):
                self.fleet.errors.append(f"{self.id}: download {type(exc).__name__} {exc}")
            await asyncio.sleep(1)

    def _finish(self, key: str, rollout: str, state: str, reason: str) -> None:
        self.report(rollout, state, reason)
        self.done.add(key)

    async def _fetch(self, entry: dict[str, Any]) -> None:
        assert self.session is not None
        sha, size = str(entry["sha256"]), int(entry["size"])
        held = self.held.setdefault(sha, bytearray())
        if len(held) > size:
            held.clear()
        headers = {"Range": f"bytes={len(held)}-"} if held else {}
        url = self.fleet.url + updater.BLOB_PATH + sha
        async with self.session.get(url, headers=headers) as resp:
            if resp.status == 200:
                held.clear()
            elif resp.status != 206 and not (resp.status == 416 and held):
                raise aiohttp.ClientError(f"hub answered {resp.status} for {entry['path']}")
            if resp.status != 416:
                self.fleet.ranged += resp.status == 206
                async for block in resp.content.iter_chunked(1 << 16):
                    held += block
                    if self.cut and len(held) >= size // 2:
                        self.cut = False
                        del held[size // 2 :]  # what reached the device before the link dropped
                        raise _Cut("cut half way")
        if len(held) != size or hashlib.sha256(held).hexdigest() != sha:
            self.held.pop(sha, None)
            raise updater.Refused(f"{entry['path']} does not match its size and sha256")
        self.fleet.downloaded += size


class SimFleet:
    """``async with SimFleet(...)``: the devices upload until the block ends."""

    def __init__(
        self,
        url: str,
        tokens: dict[str, str],
        public_key: str,
        *,
        interval: float,
        heartbeat: dict[str, Any],
        cut_every: int = 10,
    ) -> None:
        self.url = url.rstrip("/")
        self.key = signing.parse_public(public_key)
        self.interval = interval
        self._heartbeat = heartbeat
        self.devices = [
            SimDevice(self, d, t, cut_every > 0 and i % cut_every == cut_every - 1)
            for i, (d, t) in enumerate(tokens.items())
        ]
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.retries = 0
        self.ranged = 0
        self.downloaded = 0
        self._tasks: list[asyncio.Task[None]] = []

    def heartbeat(self) -> dict[str, Any]:
        body = dict(self._heartbeat)
        body["time"] = time.time()
        return body

    async def __aenter__(self) -> SimFleet:
        self._tasks = [asyncio.create_task(d.run(), name=f"sim-{d.id}") for d in self.devices]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def seen(self) -> int:
        return sum(1 for d in self.devices if d.uploads)
