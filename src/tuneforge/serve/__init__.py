"""OpenAI-compatible serving of one base model and many LoRA adapters on it.

    from tuneforge.serve import Engine, create_app, load_pool
    engine = Engine(load_pool("smollm2-135m-instruct", {"triage": "runs/triage"}))   # an AdapterPool
    app = create_app(engine, api_keys=["secret"])     # FastAPI; run it with uvicorn, or mount it
    ...
    engine.close()

`adapters.py` holds the base model and its adapters (loaded on first use, least recently used
evicted), `engine.py` the request queue and the worker thread that batches requests over
`tuneforge.generate.Batch`, `app.py` the routes and OpenAI-shaped bodies, `metrics.py` serving's
figures (time to first token, tokens, queue, batch, adapters), `completion_store.py` the stored
chat completions and `completion_routes.py` their routes, `command.py` `tuneforge serve`, and
`from_completions.py` `tuneforge data from-completions` (stored completions as training data).
Errors, keys, the body cap, request metrics and logs are `tuneforge.web`'s, shared with the jobs service.
"""

from .adapters import AdapterPool, load_pool
from .app import create_app
from .bodies import ChatCompletionBody, CompletionBody, ResponsesBody
from .completion_store import CompletionStore, Retention
from .engine import Engine, EngineError, Generation

__all__ = [
    "AdapterPool",
    "ChatCompletionBody",
    "CompletionBody",
    "ResponsesBody",
    "CompletionStore",
    "Engine",
    "EngineError",
    "Generation",
    "Retention",
    "create_app",
    "load_pool",
]
