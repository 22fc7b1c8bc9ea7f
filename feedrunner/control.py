"""The HTTP server: /metrics /healthz /readyz /status and POST /rollout/{action}.

Binds where server.listen says (loopback by default). With a token configured, every endpoint but the
probes (/healthz, /readyz) requires `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from feedrunner.plan import spec_to_dict
from feedrunner.rollout import ActionError

if TYPE_CHECKING:
    from feedrunner.runner import Runner

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=str, indent=1), status=status, content_type="application/json")


class ControlServer:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.spec = runner.spec.server
        self._site: web.TCPSite | None = None
        self._app_runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        app.router.add_post("/rollout/{action}", self._rollout)
        app.router.add_post("/reload", self._reload)
        app.router.add_get("/config", self._config)
        self._app_runner = web.AppRunner(app, access_log=None)
        await self._app_runner.setup()
        self._site = web.TCPSite(self._app_runner, self.spec.host, self.spec.port)
        await self._site.start()
        server = self._site._server  # the bound socket tells the real port when listen asked for 0
        self.port = server.sockets[0].getsockname()[1] if server and server.sockets else self.spec.port
        logger.info("control server on http://{}:{}", self.spec.host, self.port)

    async def stop(self) -> None:
        if self._app_runner is not None:
            await self._app_runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        token = self.spec.token
        if token is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.reveal().encode()):
                return _json({"error": "missing or wrong bearer token"}, 401)
        return await handler(request)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.runner.refresh_gauges()
        return web.Response(
            body=generate_latest(self.runner.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        problems = self.runner.not_ready()
        return _json({"ready": not problems, "problems": problems}, 200 if not problems else 503)

    async def _status(self, request: web.Request) -> web.Response:
        return _json(self.runner.status())

    async def _reload(self, request: web.Request) -> web.Response:
        result, changes, problems = await self.runner.reload_file()
        body = {"result": result, "changes": [c.as_dict() for c in changes], "problems": [str(p) for p in problems]}
        return _json(body, 422 if result == "invalid" else 200)

    async def _config(self, request: web.Request) -> web.Response:
        return _json(spec_to_dict(self.runner.spec))

    async def _rollout(self, request: web.Request) -> web.Response:
        controller = self.runner.rollout
        if controller is None:
            return _json({"error": "no rollout in feeds.yaml"}, 404)
        action = request.match_info["action"]
        full = request.query.get("full", "") in ("1", "true", "yes")
        try:
            controller.act(action, full=full)
        except ActionError as exc:
            return _json({"error": str(exc), "rollout": controller.status()}, 409)
        logger.info("rollout {}{} requested over HTTP", action, " --full" if full else "")
        return _json(controller.status())
