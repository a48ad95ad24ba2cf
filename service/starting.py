"""The ASGI app of a replica whose model is still loading.

A Ray Serve replica routes requests only once its constructor returned, and loading a
model takes seconds to minutes: without this, `/health` hangs in the proxy while the
replica starts, which neither probes nor people can read. So the deployment's
constructor returns at once with a `StartingGate` as its ASGI app and loads the engine on
a background task; until the gate opens:

- `GET /health` -> 503 `{"status": "starting"}` (or `{"status": "failed", "error": ...}`
  when loading failed; the replica's health check then fails and Serve replaces it);
- every other path -> 503 in OpenAI's error shape with `Retry-After`.

`open(app)` runs the real app's lifespan startup (the engine loop starts) and from then on
hands every request to it; the gate's own lifespan shutdown runs the real app's shutdown
(running streams get their grace period).
"""
from __future__ import annotations

import asyncio
import json
import logging

from . import protocol as P

log = logging.getLogger("dflash.http")


class StartingGate:
    def __init__(self, retry_after_s: int = 5):
        self.retry_after_s = retry_after_s
        self.app = None
        self.error: str | None = None
        self._lifespan_in: asyncio.Queue | None = None
        self._lifespan_out: asyncio.Queue | None = None
        self._lifespan_task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.app is not None

    async def open(self, app) -> None:
        """Start `app`'s lifespan, then route every request to it."""
        self._lifespan_in, self._lifespan_out = asyncio.Queue(), asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._lifespan_task = asyncio.get_running_loop().create_task(
            app(scope, self._lifespan_in.get, self._lifespan_out.put))
        await self._lifespan_in.put({"type": "lifespan.startup"})
        msg = await self._lifespan_out.get()
        if msg["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app failed to start: {msg.get('message', msg['type'])}")
        self.app = app

    def fail(self, error: str) -> None:
        self.error = error

    async def close(self) -> None:
        if self._lifespan_task is None or self._lifespan_task.done():
            return
        await self._lifespan_in.put({"type": "lifespan.shutdown"})
        await self._lifespan_out.get()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._own_lifespan(receive, send)
            return
        if self.app is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        if scope.get("path") == "/health":
            body = {"status": "failed", "error": self.error} if self.error else {"status": "starting"}
        else:
            msg = (f"the model failed to load: {self.error}" if self.error
                   else "the server is starting (loading the model); retry shortly")
            body = P.error_body(msg, "service_unavailable", code="starting" if not self.error else "load_failed")
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                (b"retry-after", str(self.retry_after_s).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def _own_lifespan(self, receive, send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                try:
                    await self.close()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return
