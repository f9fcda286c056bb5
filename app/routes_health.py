"""Liveness and readiness, for load balancers and Kubernetes probes.

`/healthz` answers as long as the event loop does: restart me only if this fails.
`/readyz` says whether new calls should be sent here: the stores answer and we are not draining.
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
    reasons = [
        problem
        for problem in (
            "draining" if services.draining else None,
            db_problem,
            kv_problem,
        )
        if problem is not None
    ]
    body = {"ready": not reasons, "reasons": reasons, "live_calls": len(services.calls)}
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
