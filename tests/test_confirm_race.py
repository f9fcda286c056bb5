"""Execute-once: however many confirmations race for one pending action, it runs at most once.

Two OS processes against a real redis-server (what two replicas do), and asyncio tasks in one
process against both fakeredis and real Redis.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

# Importing registers the test tools in this process and in the spawned ones.
from tests.test_runner import TENANT, executions, make_ctx, propose, say
from tools import audit, run
from tools.db.engine import make_engine, make_sessionmaker, migrate

ROUNDS = 40
TASKS = 8
Db = async_sessionmaker[AsyncSession]


@pytest.fixture
async def db(sqlite_url: str) -> AsyncIterator[Db]:
    await migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


# --- two processes ------------------------------------------------------------------------------


def race_worker(
    redis_url: str,
    db_url: str,
    tool: str,
    confirmation_ids: list[str],
    start: Any,  # multiprocessing.Barrier
    results: Any,  # multiprocessing.Queue
) -> None:
    """One "replica": for each confirmation, wait for the other process, then go."""
    results.put(asyncio.run(_race(redis_url, db_url, tool, confirmation_ids, start)))


async def _race(
    redis_url: str, db_url: str, tool: str, confirmation_ids: list[str], start: Any
) -> list[tuple[str, str]]:
    kv = Redis.from_url(redis_url, decode_responses=True)
    engine = make_engine(db_url)
    ctx = make_ctx(kv, make_sessionmaker(engine), conversation_id="CA-race")
    outcomes = []
    try:
        for cid in confirmation_ids:
            await asyncio.to_thread(start.wait, 30)
            result = await run(tool, {"confirmation_id": cid}, ctx)
            outcomes.append((cid, result["status"] + ":" + str(result.get("reason"))))
    finally:
        await kv.aclose()
        await engine.dispose()
    return outcomes


async def race_processes(
    redis_url: str, tmp_path: Path, tools: tuple[str, str]
) -> tuple[list[str], Counter[tuple[str, str]], Counter[str]]:
    """Propose ROUNDS actions, get a yes, and let one process per tool race over them."""
    kv = Redis.from_url(redis_url, decode_responses=True)
    await kv.flushdb()
    db_urls = [f"sqlite+aiosqlite:///{tmp_path}/replica{n}.db" for n in range(len(tools))]
    for url in db_urls:
        await migrate(url)
    engine = make_engine(db_urls[0])
    try:
        ctx = make_ctx(kv, make_sessionmaker(engine), conversation_id="CA-race")
        cids = [await propose(ctx, ref=ref) for ref in range(1, ROUNDS + 1)]
        await say(ctx, "yes")
    finally:
        await engine.dispose()

    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(len(tools))
    results = spawn.Queue()
    processes = [
        spawn.Process(target=race_worker, args=(redis_url, url, tool, cids, start, results))
        for tool, url in zip(tools, db_urls, strict=True)
    ]
    for process in processes:
        process.start()
    outcomes = [await asyncio.to_thread(results.get, True, 120) for _ in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    by_cid = Counter((cid, outcome) for result in outcomes for cid, outcome in result)

    # The audit trails of both replicas together: what actually ran, per confirmation.
    audited: Counter[str] = Counter()
    for url in db_urls:
        engine = make_engine(url)
        try:
            for row in await audit.history(make_sessionmaker(engine), TENANT):
                if row.outcome in ("executed", "cancelled"):
                    audited[f"{row.confirmation_id}:{row.outcome}"] += 1
        finally:
            await engine.dispose()

    executed = [await executions(kv, ref) for ref in range(1, ROUNDS + 1)]
    await kv.aclose()
    assert len(executed) == len(cids)
    return cids, by_cid, audited


async def test_two_processes_confirming_run_it_once(redis_url: str, tmp_path: Path) -> None:
    cids, outcomes, audited = await race_processes(
        redis_url, tmp_path, ("confirm_action", "confirm_action")
    )
    kv = Redis.from_url(redis_url, decode_responses=True)
    try:
        for ref, cid in enumerate(cids, start=1):
            assert await executions(kv, ref) == 1, cid
            assert outcomes[(cid, "executed:None")] == 1, outcomes
            assert outcomes[(cid, "rejected:already_executed")] == 1, outcomes
            assert audited[f"{cid}:executed"] == 1
    finally:
        await kv.aclose()


async def test_confirm_racing_cancel_across_processes(redis_url: str, tmp_path: Path) -> None:
    cids, outcomes, audited = await race_processes(
        redis_url, tmp_path, ("confirm_action", "cancel_action")
    )
    kv = Redis.from_url(redis_url, decode_responses=True)
    try:
        for ref, cid in enumerate(cids, start=1):
            ran = await executions(kv, ref)
            if ran:
                assert outcomes[(cid, "executed:None")] == 1
                assert outcomes[(cid, "rejected:already_executed")] == 1
            else:
                assert outcomes[(cid, "cancelled:None")] == 1
                assert outcomes[(cid, "rejected:cancelled")] == 1
            assert audited[f"{cid}:executed"] + audited[f"{cid}:cancelled"] == 1
            assert audited[f"{cid}:executed"] == ran <= 1
    finally:
        await kv.aclose()


# --- asyncio tasks ------------------------------------------------------------------------------


async def test_concurrent_confirmations_run_it_once(kv: Redis, db: Db) -> None:
    ctx = make_ctx(kv, db, conversation_id="CA-tasks")
    for ref in range(1, ROUNDS + 1):
        cid = await propose(ctx, ref=ref)
        await say(ctx, "yes")
        results = await asyncio.gather(
            *(run("confirm_action", {"confirmation_id": cid}, ctx) for _ in range(TASKS))
        )
        statuses = Counter((r["status"], r.get("reason")) for r in results)
        assert statuses == {("executed", None): 1, ("rejected", "already_executed"): TASKS - 1}
        assert await executions(kv, ref) == 1


async def test_concurrent_confirm_and_cancel_have_one_winner(kv: Redis, db: Db) -> None:
    ctx = make_ctx(kv, db, conversation_id="CA-tasks")
    for ref in range(1, ROUNDS + 1):
        cid = await propose(ctx, ref=ref)
        await say(ctx, "yes")
        attempts = [
            run(tool, {"confirmation_id": cid}, ctx)
            for tool in ("confirm_action", "cancel_action") * (TASKS // 2)
        ]
        results = await asyncio.gather(*attempts)
        won = [r["status"] for r in results if r["status"] in ("executed", "cancelled")]
        assert len(won) == 1, results
        assert await executions(kv, ref) == (1 if won[0] == "executed" else 0)
