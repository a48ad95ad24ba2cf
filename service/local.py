"""Run the HTTP app in this process: a uvicorn server on a background thread.

    with LocalServer(cfg) as srv:          # builds the colocated engine from cfg
        httpx.post(srv.url + "/v1/completions", json=...)

Used by tests and by service/bench_serve.py; `dflash serve --runtime uvicorn` is the same
app in the foreground.
"""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from .app import Server, build_app
from .config import ServiceConfig


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    def __init__(self, config: ServiceConfig, engine=None, tokenizer=None, host: str = "127.0.0.1",
                 port: int | None = None):
        if engine is None:
            from .engines import build_colocated
            engine, tokenizer = build_colocated(config)
        self.server = Server(config, engine, tokenizer)
        self.app = build_app(self.server)
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, host=host, port=self.port, log_level="warning",
                                                      timeout_graceful_shutdown=1, lifespan="on"))
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 60.0) -> "LocalServer":
        self._thread = threading.Thread(target=self._uvicorn.run, name="dflash-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the local server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=60)

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
