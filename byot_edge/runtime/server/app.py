"""create_app: the FastAPI app over an anytime model, its routers mounted on one context."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI

from byot_edge import __version__
from byot_edge.runtime.anytime import AnytimeModel
from byot_edge.runtime.metrics import ServerMetrics
from byot_edge.runtime.server.config import ServeConfig
from byot_edge.runtime.server.context import ServerContext
from byot_edge.runtime.server.fast import FastPredict, Receive, Scope, Send
from byot_edge.runtime.server.http import Observe, bearer_auth, install_error_handlers
from byot_edge.runtime.server.oip import oip_router
from byot_edge.runtime.server.routes import info_router, predict_router

# A router factory: given the shared context, the routes it adds.
RouterFactory = Callable[[ServerContext], APIRouter]
ROUTERS: tuple[RouterFactory, ...] = (predict_router, info_router, oip_router)

DESCRIPTION = ("An anytime classifier: each request is answered by the shallowest exit of a "
               "self-distilled multi-exit network that is confident enough, or by the deepest "
               "exit that fits a latency budget. Requests that arrive together run as one "
               "batch.")


class ByotApp(FastAPI):
    """FastAPI, with the common case of POST /v1/predict answered first by the fast path
    (byot_edge.runtime.server.fast); everything else, and every request that path leaves,
    goes through FastAPI as usual."""

    fast: FastPredict | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast
        query = None if fast is None else fast.takes(scope)
        if query is not None and fast is not None:
            await fast(scope, receive, send, query)
            return
        await super().__call__(scope, receive, send)


def create_app(model: AnytimeModel, config: ServeConfig | None = None, *,
               routers: Sequence[RouterFactory] = ()) -> ByotApp:
    """The FastAPI app serving `model`: /v1/predict, /v1/model, /healthz, /readyz,
    /metrics, the Open Inference Protocol's /v2 routes, then each of `routers` built on the
    same context (app.state.context). Its lifespan starts the batching worker and warms the
    model up in it; /readyz answers 200 once that is done."""
    config = config or ServeConfig()
    metrics = ServerMetrics(model.num_exits)
    protect = [Depends(bearer_auth(config.token))] if config.token else []
    ctx = ServerContext(model, config, metrics, protect)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ctx.start()
        try:
            yield
        finally:
            await ctx.stop()

    app = ByotApp(title="byot-edge", version=__version__, lifespan=lifespan,
                  description=DESCRIPTION)
    app.state.context = ctx
    app.add_middleware(Observe, metrics=metrics)
    install_error_handlers(app)
    for make in (*ROUTERS, *routers):
        app.include_router(make(ctx))
    if config.fast_path:
        app.fast = FastPredict(ctx)
    return app
