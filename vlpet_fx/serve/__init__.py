"""``vlpet-fx serve``: an HTTP endpoint (FastAPI + uvicorn) answering prompts about images, batching concurrent
requests into one generate call."""

from .app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
