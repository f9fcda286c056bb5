"""A durable local spool for records the SQL store could not take when they were made.

When the database is unreachable mid-call, the call record and any lead the caller confirmed
must not be lost. They are written here instead, one JSON file per record, in the maildir way:
written to `tmp/`, fsynced, then renamed into the spool directory (a rename is atomic, so a
crash leaves either a whole record or none) and the directory fsynced. A flusher replays them,
oldest first, once the store answers again, and deletes each file only after its write
committed.

Replays are idempotent, so a crash between a commit and the delete costs nothing:
* call records upsert by (tenant, CallSid) (`tools.records.save_call`);
* leads upsert by their natural key (tenant, conversation, job type), which is what
  `capture_lead` itself does when a caller repeats a request. A spooled lead has no database
  id until it is replayed, so the caller is given the spool entry's short reference instead.

A record whose replay fails for any reason other than an outage (bad data, a schema change)
is moved to `failed/` with its error and logged: kept on disk for an operator, never retried
in a loop, never silently dropped.

The spool is local to one replica; its directory must be on a persistent volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from asyncpg.exceptions import (
    CannotConnectNowError,
    ConnectionDoesNotExistError,
    OperatorInterventionError,
    PostgresConnectionError,
)
from asyncpg.exceptions import InterfaceError as AsyncpgInterfaceError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from prompts.profiles import BusinessProfile
    from tools.records import CallRecord

log = logging.getLogger(__name__)

CALL = "call"
LEAD = "lead"
# Where a tool finds the spool: ToolContext.extra[SPOOL_KEY] (set by the app for live calls).
SPOOL_KEY = "spool"
SUFFIX = ".json"

Replayer = Callable[[dict[str, Any]], Awaitable[None]]

# What the database driver raises when the server is gone, starting up or shutting down.
_OUTAGES = (
    OSError,
    TimeoutError,
    OperationalError,
    InterfaceError,
    PostgresConnectionError,
    ConnectionDoesNotExistError,
    CannotConnectNowError,
    OperatorInterventionError,
    AsyncpgInterfaceError,
)


def is_store_outage(error: BaseException) -> bool:
    """True if `error` means "the database is unreachable" rather than "this write is wrong".

    Connection refused/reset and timeouts surface as OSError/TimeoutError (asyncpg connecting),
    or wrapped by SQLAlchemy as OperationalError/InterfaceError or an invalidated connection.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _OUTAGES):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


@dataclass(frozen=True, slots=True)
class ReplayReport:
    written: int = 0  # replayed and removed from the spool
    failed: int = 0  # moved to failed/ (not an outage: the record itself was refused)
    remaining: int = 0  # still spooled (the store is still down)
    outage: bool = False  # the replay stopped because the store is still unreachable


class Spool:
    """One directory of pending records; safe for one process (one flusher at a time)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._replaying = asyncio.Lock()
        # Observers for metrics: called with (event, kind): "spooled", "replayed", "failed".
        self.observers: list[Callable[[str, str], None]] = []

    @property
    def failed_directory(self) -> Path:
        return self.directory / "failed"

    def entries(self) -> list[Path]:
        """Spooled records, oldest first (names start with a nanosecond timestamp)."""
        try:
            return sorted(p for p in self.directory.iterdir() if p.name.endswith(SUFFIX))
        except FileNotFoundError:
            return []

    def failed_entries(self) -> list[Path]:
        """Records the store refused (kept in failed/ for a person to look at)."""
        try:
            return sorted(p for p in self.failed_directory.iterdir() if p.name.endswith(SUFFIX))
        except FileNotFoundError:
            return []

    def __len__(self) -> int:
        return len(self.entries())

    # -- writing ----------------------------------------------------------------------------
    async def put(self, kind: str, payload: Mapping[str, Any]) -> str:
        """Store one record durably; returns its entry id (the file name without suffix)."""
        entry_id = f"{time.time_ns():020d}-{kind}-{uuid.uuid4().hex}"
        data = orjson.dumps({"kind": kind, "payload": payload}, default=str)
        await asyncio.to_thread(self._write, entry_id, data)
        log.warning("spooled a %s record to %s (the database is unreachable)", kind, self.directory)
        self._notify("spooled", kind)
        return entry_id

    def _write(self, entry_id: str, data: bytes) -> None:
        tmp = self.directory / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        staging = tmp / (entry_id + SUFFIX)
        with open(staging, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, self.directory / (entry_id + SUFFIX))
        _fsync_directory(self.directory)

    # -- replaying --------------------------------------------------------------------------
    async def replay(self, replayers: Mapping[str, Replayer]) -> ReplayReport:
        """Write spooled records through `replayers` (by kind), oldest first.

        Stops at the first outage (the rest would fail the same way); the records stay.
        """
        async with self._replaying:
            written = failed = 0
            entries = self.entries()
            for index, path in enumerate(entries):
                try:
                    kind, payload = _load(path)
                    replayer = replayers.get(kind)
                    if replayer is None:
                        raise ValueError(f"no replayer for spooled records of kind {kind!r}")
                    await replayer(payload)
                except Exception as error:
                    if is_store_outage(error):
                        return ReplayReport(written, failed, len(entries) - index, outage=True)
                    await asyncio.to_thread(self._quarantine, path, error)
                    self._notify("failed", _kind_of(path))
                    failed += 1
                    continue
                await asyncio.to_thread(_remove, path)
                self._notify("replayed", kind)
                written += 1
            if written or failed:
                log.info("spool replayed: %d written, %d failed", written, failed)
            return ReplayReport(written, failed, 0)

    async def run_flusher(self, replayers: Mapping[str, Replayer], interval_s: float) -> None:
        """Replay every `interval_s` while there is something to replay; until cancelled."""
        while True:
            if self.entries():
                try:
                    report = await self.replay(replayers)
                except Exception:  # a broken disk must not end the process, only be loud
                    log.exception("spool replay failed")
                else:
                    if report.outage:
                        log.info("spool: store still unreachable, %d waiting", report.remaining)
            await asyncio.sleep(interval_s)

    def _quarantine(self, path: Path, error: Exception) -> None:
        self.failed_directory.mkdir(parents=True, exist_ok=True)
        target = self.failed_directory / path.name
        os.replace(path, target)
        target.with_suffix(".error.txt").write_text(f"{type(error).__name__}: {error}\n")
        _fsync_directory(self.directory)
        log.critical(
            "spooled record %s could not be written (%s: %s); kept in %s",
            path.name,
            type(error).__name__,
            str(error)[:300],
            self.failed_directory,
        )

    def _notify(self, event: str, kind: str) -> None:
        for observer in self.observers:
            with contextlib.suppress(Exception):
                observer(event, kind)


def _load(path: Path) -> tuple[str, dict[str, Any]]:
    record = orjson.loads(path.read_bytes())
    if not isinstance(record, dict) or not isinstance(record.get("payload"), dict):
        raise ValueError("not a spool record")
    return str(record.get("kind")), record["payload"]


def _kind_of(path: Path) -> str:
    parts = path.name.split("-")
    return parts[1] if len(parts) > 2 else "unknown"


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # The rename or unlink is only durable once the directory entry itself is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the records this project spools ---------------------------------------------------------


def call_record_payload(record: CallRecord) -> dict[str, Any]:
    return dataclasses.asdict(record)


def call_record_from_payload(payload: Mapping[str, Any]) -> CallRecord:
    from tools.records import CallRecord

    fields = {f.name for f in dataclasses.fields(CallRecord)}
    values = {key: value for key, value in payload.items() if key in fields}
    for key in ("started_at", "ended_at"):
        if isinstance(values.get(key), str):
            values[key] = datetime.fromisoformat(values[key])
    return CallRecord(**values)


def store_replayers(
    db: async_sessionmaker[AsyncSession],
    kv: Redis,
    profile_for: Callable[[str], BusinessProfile | None],
) -> dict[str, Replayer]:
    """How each kind of spooled record is written to the store once it is back."""

    async def replay_call(payload: dict[str, Any]) -> None:
        from tools.records import save_call

        await save_call(db, call_record_from_payload(payload))

    async def replay_lead(payload: dict[str, Any]) -> None:
        from tools.handlers.dispatch import replay_spooled_lead

        profile = profile_for(str(payload.get("tenant")))
        if profile is None:
            raise ValueError(f"spooled lead for unknown profile {payload.get('tenant')!r}")
        await replay_spooled_lead(payload, db=db, kv=kv, profile=profile)

    return {CALL: replay_call, LEAD: replay_lead}
