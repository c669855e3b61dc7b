"""The HTTP server: FastAPI over the anytime model, with dynamic batching.

    model = AnytimeModel.load("deploy/manifest.json", backend="onnxruntime")
    app = create_app(model, ServeConfig(max_batch=32, max_wait_ms=2))  # any ASGI server
    # `byot-edge serve` runs it under uvicorn (byot_edge.cli.serve: signals, draining).

Endpoints: POST /v1/predict, GET /v1/model, GET /healthz, GET /readyz, GET /metrics, the
Open Inference Protocol v2 (/v2/..., oip.py: what Triton speaks), and the OpenAPI schema
(/openapi.json, /docs). docs/serving.md describes them for users.

Modules, one idea each:

- config: ServeConfig, the settings;
- context: ServerContext, what every route shares (model, batcher, config, metrics,
  readiness, the queue's bound, the body budget) and `predict`, the path of every
  prediction request;
- budget: BodyBudget, the bytes of request bodies held at once, server-wide;
- schemas: the pydantic answers, which are the OpenAPI documentation;
- encode: answers and errors as response bytes (no pydantic model per request);
- http: reading bodies under the limits, multipart, auth, metrics middleware, errors;
- routes: the /v1 and health routers; oip: the /v2 router; app: create_app;
- fast: POST /v1/predict's common case in plain ASGI, ahead of FastAPI (the same context,
  decoder, answers and metrics; what it is not sure of goes to the route).
- Request bodies are decoded by byot_edge.runtime.decode (no web framework there).

Another router (e.g. the Open Inference Protocol) is a function of the context:

    def oip_router(ctx: ServerContext) -> APIRouter:
        router = APIRouter(dependencies=ctx.protect)   # the bearer token, if any
        @router.post("/v2/models/{name}/infer")
        async def infer(request: Request) -> ...:
            options = ctx.options(exit=...)             # validated once, here
            answer = await ctx.predict(options, read, decode)  # 503s, queue, batcher
            ...
        return router

    app = create_app(model, config, routers=[oip_router])

FastAPI reads a route's annotations at run time: in a module with `from __future__ import
annotations`, every name they use (Request, a local bound) must resolve in its globals.

Only this package (and the CLI command that calls it) imports fastapi; the rest of the
package never imports it. A RequestError answers its status, another ByotError 422.
"""

from byot_edge.errors import missing_dependency

try:
    import fastapi  # noqa: F401  (the serve extra: fail here with the install command)
except ImportError:
    raise missing_dependency("fastapi", "serve", "to serve models") from None

from byot_edge.runtime.server.app import RouterFactory, create_app
from byot_edge.runtime.server.config import ServeConfig
from byot_edge.runtime.server.context import ServerContext
from byot_edge.runtime.server.schemas import ModelInfo, PredictResponse

__all__ = ["ModelInfo", "PredictResponse", "RouterFactory", "ServeConfig", "ServerContext",
           "create_app"]
