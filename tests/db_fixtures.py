"""CRM store fixtures (loaded by tests/conftest.py through pytest_plugins).

- `db_url`: a freshly migrated database, parametrized as `db_url[sqlite]` and `db_url[postgres]`.
- `db`: an `async_sessionmaker` on it; the engine is disposed after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tools.db.engine import make_engine, make_sessionmaker, migrate


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    await migrate(url)
    return url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = make_engine(db_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()
