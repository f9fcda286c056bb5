"""The ASGI application: routes per the contract, services opened and closed by the lifespan.

switchboard serve
# or by hand; --ws puts /media-stream on picows, as `serve` does (app.media_socket):
uvicorn --factory app.main:create_app --ws app.media_socket:MediaSocketProtocol
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from app.metrics import metrics_endpoint
from app.routes_health import healthz, readyz
from app.routes_sms import sms_incoming, sms_status
from app.routes_voice import voice_incoming, voice_status
from app.services import open_services
from app.settings import Settings, get_settings

log = logging.getLogger("switchboard.app")


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        services = await open_services(settings)
        app.state.services = services
        log.info(
            "switchboard ready",
            extra={
                "public_url": settings.public_url,
                "media_stream_url": settings.media_stream_url,
                "realtime_url": settings.openai_realtime_url,
                "audio_mode": settings.audio_mode,
            },
        )
        try:
            yield
        finally:
            await services.close()

    routes = [
        Route("/voice/incoming", voice_incoming, methods=["POST"]),
        Route("/voice/status", voice_status, methods=["POST"]),
        # Under the app's own uvicorn config (app.serving) this path never reaches the ASGI app:
        # app.media_socket serves it on picows. The route serves it under any other server.
        WebSocketRoute("/media-stream", media_stream),
        Route("/sms/incoming", sms_incoming, methods=["POST"]),
        Route("/sms/status", sms_status, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def media_stream(websocket: WebSocket) -> None:
    # Imported on first use: the media handler pulls in the whole bridge, which the webhooks,
    # probes and CLI verbs never need.
    from app.media import media_stream as handle

    await handle(websocket)
