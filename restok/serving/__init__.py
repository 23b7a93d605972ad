"""Serving and scale-out over the runtime (no torch): the dynamic-batching HTTP server (``restok serve``),
its Ray Serve deployment, offline sampling jobs (``restok sample``) and a load generator
(``restok loadtest``). Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client, httpx); Ray needs the
``ray`` extra."""
