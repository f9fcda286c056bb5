"""The CRM store: models, engines/migrations and tenant-scoped sessions."""

from tools.db.engine import async_url, downgrade, make_engine, make_sessionmaker, migrate
from tools.db.tenancy import CrossTenantError, tenant_session

__all__ = [
    "CrossTenantError",
    "async_url",
    "downgrade",
    "make_engine",
    "make_sessionmaker",
    "migrate",
    "tenant_session",
]
