"""Engines for the two placements, built from a ServiceConfig.

- colocated: `build_colocated(cfg)` = dflash_core.api.build_engine (target + drafter in
  this process, LocalDraftBackend);
- disaggregated: `build_drafter_server(cfg)` on the drafter side (the drafter alone,
  shaped by the target's config, no target weights), and `build_remote_target(cfg,
  drafter_config, request_join)` on the target side (the target + a RemoteDraftBackend).
Both load the drafter through `dflash_core.api.load_drafter`, so "default"/"random"/a
folder mean the same thing in both placements.
Each builder loads on a thread that exits when it is done (`dflash_core.runtime.
on_fresh_thread`): the engine loop thread (or the drafter's serve thread) is then the only
thread of the process with an OpenMP pool, which keeps libgomp's waiters spinning
between a step's parallel regions instead of sleeping (~1.6x faster decoding, 2 cores).
"""
from __future__ import annotations

import functools
import logging
import os
import time

import torch

from dflash_core.api import build_engine, drafter_folder, load_drafter
from dflash_core.autoschedule import (ACCEPTANCE_FILE, ScheduleTuner, format_rows, load_acceptance,
                                      measured_beyond, measured_schedule, profile_tree_tau)
from dflash_core.drafter import DFlashDrafter, DrafterConfig
from dflash_core.engine import EngineConfig, format_block_size_schedule
from dflash_core.models.registry import resolve_model
from dflash_core.runtime import on_fresh_thread

from .config import ServiceConfig
from .transport import DrafterServer, RemoteDraftBackend

log = logging.getLogger("dflash.service")


def torch_dtype(cfg: ServiceConfig) -> torch.dtype:
    from dflash_core.runtime import resolve_dtype
    name = getattr(cfg, "dtype", "auto")
    if name == "float16":
        return torch.float16
    return resolve_dtype(name, cfg.device)


def apply_threads(cfg: ServiceConfig) -> int:
    """torch's CPU threads for this replica process -> the count now in force:
    cfg.threads, or with 0 every CPU the process may run on (torch's own default outside
    Ray; Ray sets OMP_NUM_THREADS = floor(num_cpus) >= 1 in its workers, so a replica with
    the default num_cpus 0.5 would decode on one thread). Call before loading the model."""
    n = cfg.threads
    if n == 0:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return torch.get_num_threads()


def engine_config(cfg: ServiceConfig) -> EngineConfig:
    return EngineConfig(max_slots=cfg.max_slots, max_seq_len=cfg.max_seq_len, block_size=cfg.block_size,
                        block_size_schedule=cfg.resolved_block_size_schedule(),
                        max_prefill_tokens=cfg.max_prefill_tokens, draft_threshold=cfg.draft_threshold,
                        draft_tree=cfg.draft_tree, draft_lookup=cfg.draft_lookup, kv_cache_dtype=cfg.kv_cache_dtype,
                        draft_corpus=cfg.draft_corpus)


def apply_native(cfg: ServiceConfig) -> None:
    """The process-wide native kernel settings the config asks for (before models load)."""
    from dflash_core import native
    native.set_amx(cfg.native_amx)
    native.set_amx_inputs(cfg.amx_inputs)
    native.set_amx_attention(cfg.amx_attention)


def _loads_on_fresh_thread(builder):
    """The builder runs on a thread that exits when it returns (module docstring)."""
    @functools.wraps(builder)
    def wrapped(*args, **kwargs):
        return on_fresh_thread(builder, *args, **kwargs)
    return wrapped


@_loads_on_fresh_thread
def build_colocated(cfg: ServiceConfig):
    """-> (SpecEngine, tokenizer), its schedule measured where cfg asks (measure_schedule)."""
    apply_native(cfg)
    engine, tok = build_engine(target=cfg.target, drafter=cfg.drafter, config=engine_config(cfg), device=cfg.device,
                               dtype=torch_dtype(cfg), drafter_weights=cfg.drafter_weights)
    measure_schedule(engine, cfg)
    return engine, tok


def measure_schedule(engine, cfg: ServiceConfig) -> dict | None:
    """For block_size_schedule "auto" / "measure": time the built engine's steps on this
    machine and pick its schedule with the drafter's acceptance profile
    (dflash_core.autoschedule), set it on the engine with a ScheduleTuner (which re-picks
    it with the acceptance the traffic gets) and log it. -> {schedule, rows,
    profile} when measured; None where the config names pairs or "table", or "auto" finds
    no profile or no drafter (the table stays). "measure" without them raises ValueError."""
    mode = cfg.block_size_schedule
    if mode not in ("auto", "measure"):
        return None
    folder = drafter_folder(cfg.drafter, cfg.target)
    profile = load_acceptance(folder) if folder is not None else None
    if profile is None or not engine.can_draft:
        if mode == "measure":
            if not engine.can_draft:
                why = "no drafter"
            elif folder is None:
                why = f"no drafter folder for {cfg.drafter!r}"
            else:
                why = f"no acceptance profile in {folder} (write one with dflash eval --save-acceptance)"
            raise ValueError(f"block_size_schedule 'measure': {why}")
        return None
    t0 = time.perf_counter()
    pairs, rows = measured_schedule(engine, profile["per_position_acceptance"], tree_tau=profile_tree_tau(engine, profile))
    engine.set_block_size_schedule(pairs)
    # from here on the traffic's own acceptance re-picks it among the timed cells
    engine.schedule_tuner = ScheduleTuner(rows, profile["per_position_acceptance"],
                                          beyond=measured_beyond(rows, engine.config.max_slots))
    log.info("block size schedule %s, measured in %.1f s on this machine with %s's acceptance profile: %s",
             format_block_size_schedule(pairs), time.perf_counter() - t0, folder.name, format_rows(rows))
    return {"schedule": pairs, "rows": rows, "profile": str(folder / ACCEPTANCE_FILE)}


@_loads_on_fresh_thread
def build_drafter_server(cfg: ServiceConfig) -> DrafterServer:
    if cfg.drafter is None or cfg.block_size < 2:
        raise ValueError("the disaggregated placement needs a drafter and block_size >= 2")
    apply_native(cfg)
    # shaped by the target's architecture; the target's weights are never loaded here
    drafter = load_drafter(cfg.drafter, resolve_model(cfg.target).config, cfg.target, cfg.block_size, cfg.device,
                           torch_dtype(cfg), cfg.drafter_weights)
    # the same capacity as the colocated backend (dflash_core.api.build_engine)
    return DrafterServer(drafter, cfg.max_slots, cfg.max_seq_len + drafter.config.block_size + 1)


@_loads_on_fresh_thread
def build_remote_target(cfg: ServiceConfig, drafter_config: dict, request_join, backend: str | None = None,
                        context_state: dict | None = None):
    """-> (SpecEngine, tokenizer, RemoteDraftBackend); the backend connects on first use
    (or call `.connect()`). The target is built by the same function as the colocated
    engine, so both placements compute the same numbers. context_state: the drafter's
    context weights (`DrafterServer.context_state()`): the context then goes over the wire
    as the drafter's own K/V (fewer bytes per token) instead of target features."""
    apply_native(cfg)
    dcfg = DrafterConfig.from_json(drafter_config)
    context_drafter = (DFlashDrafter.context_only(dcfg, context_state, cfg.device, torch_dtype(cfg))
                       if context_state is not None else None)
    remote = RemoteDraftBackend(dcfg, request_join, device=cfg.device,
                                backend=backend or cfg.transport_backend, timeout_s=cfg.transport_timeout_s,
                                step_timeout_s=cfg.drafter_step_timeout_s, context_drafter=context_drafter)
    # the drafter spec names the corpus index (draft_corpus auto) only: the backend drafts
    engine, tok = build_engine(target=cfg.target, drafter=cfg.drafter, config=engine_config(cfg), device=cfg.device,
                               dtype=torch_dtype(cfg), draft_backend=remote)
    return engine, tok, remote
