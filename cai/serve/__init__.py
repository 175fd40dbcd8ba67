"""``cai serve``: the judge and/or a trained reward model as an HTTP service for RL trainers,
split as vLLM splits its entrypoints.

    protocol.py  the request bodies, their checks (4xx naming the field) and the options
    service.py   the service: each endpoint's work, through one coalescing batcher
    batching.py  the coalescing batcher (many requests → the engine's large batches)
    app.py       the ASGI gate (API key, body limit, metrics), the FastAPI app, the runner
    metrics.py   the Prometheus metrics

    cai serve --model smollm2-135m --constitution harmless [--reward-model DIR] [--port 8000]
"""

from cai.serve.app import create_app, serve
from cai.serve.metrics import Metrics
from cai.serve.protocol import BadRequest, ServeOptions, check_options
from cai.serve.service import Service

__all__ = [
    "BadRequest",
    "Metrics",
    "ServeOptions",
    "Service",
    "check_options",
    "create_app",
    "serve",
]
