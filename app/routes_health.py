"""Liveness and readiness, for load balancers and Kubernetes probes.

`/healthz` answers as long as the event loop does: restart me only if this fails.
`/readyz` says whether new calls should be sent here:

* draining (SIGTERM): 503, reasons ["draining"]: send new calls elsewhere.
* Redis down: 200, listed under `degraded`. Live calls go on (writes are refused politely);
  a new call cannot be connected (its one-time stream token lives in Redis), but this replica
  still answers it with a polite "unavailable" message, which is better for the caller than
  the load balancer's error that a 503 on every replica would bring.
* Database down: 200, with the problem under `degraded` (and how many records wait in the
  spool): calls run normally, their records and leads wait on local disk (`tools.spool`).
* Both recover by themselves: the next probe after the store answers is healthy again.

A healthy body is exactly {"ready": true, "reasons": [], "live_calls": n}.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from sqlalchemy import text
from starlette.responses import JSONResponse

if TYPE_CHECKING:
    from starlette.requests import Request

    from app.services import Services

# Probes time out after a second or so; a store slower than this is as good as down.
CHECK_TIMEOUT_S = 2.0


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    services: Services = request.app.state.services
    db_problem, kv_problem = await asyncio.gather(_check_db(services), _check_kv(services))
    reasons = ["draining"] if services.draining else []
    body: dict[str, object] = {
        "ready": not reasons,
        "reasons": reasons,
        "live_calls": len(services.calls),
    }
    degraded = [problem for problem in (db_problem, kv_problem) if problem is not None]
    if degraded:
        body["degraded"] = degraded
    spooled = len(services.spool) if services.spool is not None else 0
    if spooled:
        body["spooled"] = spooled
    return JSONResponse(body, status_code=503 if reasons else 200)


async def _check_db(services: Services) -> str | None:
    async def ping() -> None:
        async with services.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    return await _probe("database", ping())


async def _check_kv(services: Services) -> str | None:
    return await _probe("redis", services.kv.ping())


async def _probe(name: str, check: Awaitable[object]) -> str | None:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await check
    except TimeoutError:
        return f"{name}: no answer within {CHECK_TIMEOUT_S:g} s"
    except Exception as error:  # any failure means "not ready", and the reason is the answer
        first_line = str(error).splitlines()[0][:200] if str(error) else ""
        return f"{name}: {type(error).__name__}: {first_line}".rstrip(": ")
    return None
