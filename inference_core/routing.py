"""Routing for a dozen fixed paths: one dict lookup, errors in OpenAI's shape, and the lifespan.

A framework's router, exception middleware and per-request wrappers cost the gateway more CPU
than its own work on a request (see ``bench/README.md``). The gateway needs little of them:
exact paths, one path-parameter route (model ids hold slashes), 404/405 and ``GatewayError``
answers, and start-up/shut-down hooks. Handlers still get a Starlette ``Request``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from inference_core.errors import GatewayError, MethodNotAllowed, NotFound

Handler = Callable[[Request], Awaitable[ASGIApp]]
ErrorHandler = Callable[[Request, GatewayError], ASGIApp]


@dataclass(frozen=True, slots=True)
class Route:
    """``path`` is the template logs and metrics name; one trailing ``{name:path}`` is allowed."""

    path: str
    methods: dict[str, Handler]
    prefix: str = field(init=False)
    parameter: str | None = field(init=False)

    def __post_init__(self) -> None:
        prefix, _, parameter = self.path.partition("{")
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "parameter", parameter.split(":")[0].rstrip("}") or None)


class Router:
    """Finds the route for a request, calls its handler and sends what it returns."""

    def __init__(self, routes: list[Route], on_error: ErrorHandler) -> None:
        self.exact = {route.path: route for route in routes if route.parameter is None}
        self.templated = [route for route in routes if route.parameter is not None]
        self.on_error = on_error

    def _match(self, scope: Scope) -> Route | None:
        path: str = scope["path"]
        route = self.exact.get(path)
        if route is not None:
            return route
        for route in self.templated:
            if path.startswith(route.prefix) and len(path) > len(route.prefix):
                scope["path_params"] = {route.parameter: path[len(route.prefix) :]}
                return route
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        route = scope["route"] = self._match(scope)
        if method == "HEAD":
            # Answered as GET would be (RFC 9110 9.3.2); the server, which still sees HEAD, sends no body.
            scope = {**scope, "method": "GET"}
        request = Request(scope, receive)
        try:
            if route is None:
                raise NotFound(f"Invalid URL ({method} {scope['path']}).")
            handler = route.methods.get(scope["method"])
            if handler is None:
                error = MethodNotAllowed(f"Method not allowed ({method} {scope['path']}).")
                error.headers["allow"] = ", ".join(_allowed(route))
                raise error
            response = await handler(request)
        except GatewayError as error:
            response = self.on_error(request, error)
        await response(scope, receive, send)


def _allowed(route: Route) -> list[str]:
    """The methods a route answers: HEAD wherever GET is."""
    methods = list(route.methods)
    return [*methods, "HEAD"] if "GET" in methods and "HEAD" not in methods else methods


class Lifespan:
    """An ASGI app with start-up and shut-down hooks around ``app``."""

    def __init__(
        self, app: ASGIApp, startup: Callable[[], Awaitable[None]], shutdown: Callable[[], Awaitable[None]]
    ) -> None:
        self.app = app
        self.startup = startup
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await receive()  # lifespan.startup
        try:
            await self.startup()
        except BaseException as exc:
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            raise
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.shutdown()
        await send({"type": "lifespan.shutdown.complete"})
