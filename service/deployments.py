"""Ray Serve application of the DFlash server.

Import path (stable; used by deploy/serve.yaml, k8s/ and `dflash serve`):
    service.deployments:build_app      build_app(args: dict) -> serve.Application
`args` are ServiceConfig fields (service/config.py), e.g. {"target": "default",
"drafter": "default", "placement": "colocated", "max_slots": 8}; unknown keys are an error.

Placements (identical tokens; see service/transport.py):
- colocated (default): one deployment `DFlashServer` = FastAPI ingress + scheduler + target
  + drafter (LocalDraftBackend).
- disaggregated: `DFlashServer` (ingress + scheduler + target, RemoteDraftBackend) and
  `DFlashDrafter` (the drafter, LocalDraftBackend behind a DrafterServer), each with
  fractional resources (`num_cpus`, `num_gpus`: 0.5 GPU each on CUDA). The ingress opens a
  TCPStore, passes its address to the drafter through a Serve handle call (`join`), and
  both join a two-rank torch.distributed group (gloo on CPU, NCCL between two GPUs; two
  replicas on one GPU use gloo with host staging: NCCL refuses two ranks per GPU). If the drafter
  replica restarts or hangs, the ingress decodes without drafts and rebuilds the group with
  the new replica through the same handle in the background (service/transport.py).
Metrics (/metrics), health (/health) and the OpenAI routes are all served by the ingress
replica. Its constructor loads the model: Serve routes to a replica only once that
returned, so a replica added by autoscaling never answers before it can serve. One
replica per deployment unless `autoscaling` is set (colocated only).
"""
from __future__ import annotations

import asyncio
import logging
import os

from ray import serve
from ray.serve.handle import DeploymentHandle

from .app import Server, build_app as build_fastapi_app, ray_node_id
from .config import ServiceConfig
from .engines import apply_threads, build_colocated, build_drafter_server, build_remote_target
from .logs import setup_logging
from .transport import comm_backend, device_id

log = logging.getLogger("dflash.deploy")


@serve.deployment(name="DFlashDrafter", num_replicas=1, max_ongoing_requests=8, health_check_period_s=10)
class DFlashDrafter:
    """The drafter side of the disaggregated placement."""

    def __init__(self, config: dict):
        self.cfg = ServiceConfig.from_dict(config)
        setup_logging(self.cfg.log_level)
        apply_threads(self.cfg)
        self.server = build_drafter_server(self.cfg)

    def drafter_config(self) -> dict:
        return self.server.drafter.config.to_json()

    def context_state(self) -> dict:
        """The drafter's context weights: the target streams K/V with them (transport_context "kv")."""
        return self.server.context_state()

    def device_id(self) -> str:
        return device_id(self.cfg.device)

    async def join(self, host: str, port: int, backend: str, timeout_s: float) -> int:
        # blocks until the target joined too: run it off the replica's event loop
        return await asyncio.to_thread(self.server.join, host, port, backend, timeout_s)

    def stats(self) -> dict:
        return {"generation": self.server.generation, "num_steps": self.server.num_steps,
                "serving": self.server.serving, "pid": os.getpid(), "node_id": ray_node_id()}


@serve.deployment(name="DFlashServer", num_replicas=1, health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()
class DFlashServer:
    """The ingress: OpenAI routes, scheduler, target (and the drafter when colocated)."""

    async def __init__(self, config: dict, drafter: DeploymentHandle | None = None):
        # Serve routes requests to a replica once this returns: load the model first, so a
        # replica added by autoscaling or a rolling update never answers "not ready yet"
        cfg = ServiceConfig.from_dict(config)
        setup_logging(cfg.log_level)
        apply_threads(cfg)
        self.backend = None
        if cfg.placement == "disaggregated":
            if drafter is None:
                raise ValueError("the disaggregated placement needs a DFlashDrafter deployment")
            drafter_config = await drafter.drafter_config.remote()
            context_state = await drafter.context_state.remote() if cfg.transport_context == "kv" else None
            backend_name = comm_backend(cfg.device, cfg.transport_backend, await drafter.device_id.remote())

            def request_join(host: str, port: int):
                # called off this replica's event loop (the engine loop or the reconnect thread)
                response = drafter.join.remote(host, port, backend_name, cfg.transport_timeout_s)
                return lambda: response.result(timeout_s=cfg.transport_timeout_s)

            engine, tokenizer, self.backend = await asyncio.to_thread(build_remote_target, cfg, drafter_config,
                                                                      request_join, backend_name, context_state)
            await asyncio.to_thread(self.backend.connect)
        else:
            engine, tokenizer = await asyncio.to_thread(build_colocated, cfg)
        self.server = Server(cfg, engine, tokenizer)

    def __serve_build_asgi_app__(self):
        return build_fastapi_app(self.server)

    async def drain(self, grace_s: float) -> bool:
        """Orderly stop (dflash serve on SIGINT/SIGTERM, before Serve removes its proxy):
        no new requests (503), running ones get grace_s, the rest end with "abort"."""
        await asyncio.to_thread(self.server.shutdown, grace_s)
        return True

    def node_id(self) -> str:
        """The Ray node this replica runs on."""
        return self.server.node_id

    def check_health(self) -> None:
        loop = self.server.loop
        if loop._thread is not None and not loop.alive:
            raise RuntimeError(f"engine loop is dead: {loop.dead_reason}")


def deployment_options(cfg: ServiceConfig) -> dict:
    # OMP_WAIT_POLICY is read when the replica's torch starts OpenMP: set per process
    # ("auto": left to the OpenMP runtime, or to what the Ray workers inherit)
    env = {} if cfg.omp_wait_policy == "auto" else {"OMP_WAIT_POLICY": cfg.omp_wait_policy.upper()}
    return {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus,
                              "runtime_env": {"env_vars": env}},
        "max_ongoing_requests": cfg.max_slots + cfg.max_queue + 16,   # admission control is ours (429)
        "graceful_shutdown_timeout_s": cfg.shutdown_grace_s + 5,
    }


def build_app(args: dict | None = None):
    """Serve application builder: ServiceConfig fields in, bound application out."""
    cfg = ServiceConfig.from_dict(dict(args or {}))
    opts = deployment_options(cfg)
    config = cfg.to_dict()
    actor = opts["ray_actor_options"]

    def pinned(resources: dict | None) -> dict:   # Ray custom resources pin a deployment to nodes
        return {**actor, "resources": dict(resources)} if resources else actor

    opts["ray_actor_options"] = pinned(cfg.target_resources)
    if cfg.autoscaling:   # Serve scales the ingress deployment (colocated only)
        opts["autoscaling_config"] = dict(cfg.autoscaling)
        opts["num_replicas"] = "auto"
    if cfg.placement == "disaggregated":
        drafter = DFlashDrafter.options(ray_actor_options=pinned(cfg.drafter_resources)).bind(config)
        return DFlashServer.options(**opts).bind(config, drafter)
    return DFlashServer.options(**opts).bind(config)
