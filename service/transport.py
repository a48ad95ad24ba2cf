"""Disaggregated placement: the drafter in another process, reached over torch.distributed.

Contract
- `RemoteDraftBackend` (target side, rank 0) satisfies the engine's DraftBackend protocol
  (docs/ENGINE_API.md): `draft(ctx_slots, ctx_positions, ctx_features, slots, block_emb,
  block_positions) -> hidden [R, B, hidden]` and `free(slot)`. It ships those tensors to a
  `DrafterServer` (rank 1), which runs the very same `LocalDraftBackend` as the colocated
  placement, so both placements produce identical drafts and therefore identical tokens.
- The two-rank group (gloo on CPU, NCCL on GPU) is formed by rendezvous on a TCPStore that
  the target side opens on a free port; the store address reaches the drafter through
  `request_join(host, port)`, a callable the caller supplies (a Ray Serve handle call, a
  Ray actor call, ...), which makes the drafter call `DrafterServer.join`.
- Failure: a step the drafter does not answer within `step_timeout_s` (it died, hung or
  restarted) degrades the link at once: the engine decodes plainly (exact output, like
  every path), `/health` says `degraded`, and a background thread asks for a drafter
  through `request_join` every `retry_interval_s`; speculation resumes when one joined
  (the new drafter has lost the context of running requests, so their drafts are worse
  until they finish; the verify step keeps the output exact). An idle link is pinged
  (`heartbeat`), so a drafter lost while nothing drafted is noticed too.
- Each side holds its own two-rank process group object (not torch.distributed's global
  default group): a group with a hung peer is aborted and dropped without waiting on it.

Wire format of one step (rank 0 -> rank 1, three messages, then one reply):
  header int64[9]   = [op, n_free, N, R, B, F, H, dtype code, context kind]   (op PING: header only, reply int64[1])
  ints   int64[...] = [free slots (n_free) | ctx_slots (N) | ctx_positions (N) | slots (R) | block_positions (R*B)]
  floats dtype[...] = [context (N*F) | block_emb (R*B*H)]
  reply  dtype[R, B, H] = drafter hidden states (final norm applied)
The context of a committed token is either its fused target features (kind 0, F =
layers fused x hidden) or, when the target side holds the drafter's context weights
(`context_drafter`), the drafter's own context K/V before k_norm/RoPE (kind 1, F = drafter
layers x 2 x KV heads x head dim, `DFlashDrafter.context_kv`): 4.5x fewer bytes per token
for the shipped drafter, 2x for the public Qwen3-8B drafter (docs/BENCHMARKS.md). The
drafter side stores either with the same context-KV kernel, so the drafts are the same.
Frees are deferred to the next step and applied before the new context is appended: the
same order in which the colocated backend sees them (no append happens between steps).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("dflash.transport")

OP_DRAFT, OP_CLOSE, OP_PING = 1, 2, 3
HEADER_LEN = 9
CTX_FEATURES, CTX_KV = 0, 1
WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The group itself never times out an idle drafter waiting for the next step; the target
# side bounds each reply wait with its own timeout instead.
_GROUP_TIMEOUT = timedelta(days=7)
_READY_KEY = "dflash/drafter_ready"


def comm_backend(device: str, requested: str = "auto", peer_device_id: str | None = None) -> str:
    """gloo on CPU; NCCL between two different GPUs. NCCL refuses two ranks on one GPU
    (the fractional-GPU case), so a peer on this very GPU gets gloo with host staging."""
    if requested != "auto":
        return requested
    if not str(device).startswith("cuda"):
        return "gloo"
    return "gloo" if peer_device_id is not None and peer_device_id == device_id(device) else "nccl"


def device_id(device: str) -> str:
    """A physical identity of the device ("cpu", or the GPU's UUID)."""
    if not str(device).startswith("cuda"):
        return "cpu"
    dev = torch.device(device)
    return str(torch.cuda.get_device_properties(dev.index if dev.index is not None else 0).uuid)


def transport_host() -> str:
    """Address the drafter can reach this process at (same node: loopback)."""
    host = os.environ.get("DFLASH_TRANSPORT_HOST")
    if host:
        return host
    try:
        import ray
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:
        pass
    return "127.0.0.1"


def _op_header(op: int) -> torch.Tensor:
    """The header of a message without a body (PING, CLOSE)."""
    return torch.tensor([op] + [0] * (HEADER_LEN - 1), dtype=torch.int64)


def _new_group(backend: str, store, rank: int, host: str, timeout: timedelta):
    """A two-rank process group of its own (not torch.distributed's global default group):
    a hung peer's group can be aborted and dropped without touching the next one."""
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, rank, 2, opts)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    raise ValueError(f"unknown transport backend {backend!r} (gloo | nccl)")


def _drop_group(pg) -> None:
    """Abort a group whose peer may be hung: pending operations fail, sockets close (the
    peer's next receive fails), nothing here waits on the peer."""
    if pg is None:
        return
    try:
        pg.abort()
    except Exception:  # already broken: nothing more to release
        log.debug("aborting the drafter group failed", exc_info=True)


class RemoteDraftBackend:
    """Target side (rank 0). `config` is the drafter's DrafterConfig (block size, mask id,
    target layer ids), fetched from the drafter side by the caller.

    Link states: `connected` (drafts flow) or degraded (no drafter: the engine decodes
    plainly, exact as ever). A step the drafter does not answer within `step_timeout_s`
    (a hung or dead drafter) degrades the link at once; a background thread then asks
    for a drafter every `retry_interval_s` (each try bounded by `timeout_s`) and the
    engine speculates again as soon as one joined. `heartbeat()` (called by the server's
    engine loop) pings an idle link, so a drafter that died while nothing drafted is
    noticed within `heartbeat_s`."""

    def __init__(self, config, request_join, device: str = "cpu", backend: str = "auto",
                 timeout_s: float = 60.0, retry_interval_s: float = 5.0, host: str | None = None,
                 step_timeout_s: float = 5.0, heartbeat_s: float = 5.0, context_drafter=None):
        """request_join(host, port) -> wait(): makes the drafter side call DrafterServer.join;
        backend: "gloo" | "nccl" (resolve "auto" with comm_backend first); context_drafter:
        a drafter holding the remote drafter's context weights (`DFlashDrafter.context_only`
        of `DrafterServer.context_state()`): the context then goes over the wire as the
        drafter's K/V instead of target features."""
        self.config = config
        self.context_drafter = context_drafter
        self.request_join = request_join
        self.device = torch.device(device)
        self.backend = comm_backend(device, backend)
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self.step_timeout_s = step_timeout_s
        self.heartbeat_s = heartbeat_s
        self.host = host
        self.num_connects = 0
        self.num_failed_steps = 0
        self.num_steps = 0          # draft exchanges that got a reply
        self.bytes_sent = 0         # over the group, this side -> drafter (pings included)
        self.bytes_received = 0
        self.last_error: str | None = None
        self._pg = None                 # the live group (None: degraded)
        self._store = None             # the live group's rendezvous store, kept open with it
        self._pending_free: dict[int, None] = {}   # ordered set: at most one entry per slot
        self._last_ok_s = time.monotonic()
        self._closed = False
        self._lock = threading.Lock()   # guards _pg swaps (engine thread vs reconnect thread)
        self._connect_lock = threading.Lock()   # one connect at a time (held while waiting)
        self._reconnector: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self._pg is not None

    @property
    def available(self) -> bool:
        """Whether a draft step can run now (the engine decodes plainly while it cannot)."""
        if self._pg is None:
            self._ensure_reconnecting()
        return self._pg is not None

    @property
    def state(self) -> str:
        return "connected" if self._pg is not None else ("closed" if self._closed else "degraded")

    # ---- group lifecycle -------------------------------------------------------------
    def connect(self) -> None:
        """(Re)build the group: open a store, ask the drafter to join, join as rank 0.
        Raises if no drafter joined within timeout_s. The engine keeps stepping meanwhile
        (the slow part holds no lock the engine takes)."""
        with self._connect_lock:
            with self._lock:
                self._drop()
            host = self.host or transport_host()
            store = dist.TCPStore(host, 0, world_size=2, is_master=True,
                                  timeout=timedelta(seconds=self.timeout_s), wait_for_workers=False)
            wait_joined = self.request_join(host, store.port)
            # the drafter marks the store before joining the group: wait for that mark with a
            # bounded timeout, so an absent drafter fails here instead of in the rendezvous
            store.wait([_READY_KEY], timedelta(seconds=self.timeout_s))
            # every operation of this group (the rendezvous with the already-ready drafter,
            # then each step) waits at most step_timeout_s for the drafter
            pg = _new_group(self.backend, store, 0, host, timedelta(seconds=self.step_timeout_s))
            try:
                wait_joined()
            except BaseException:
                _drop_group(pg)
                raise
            with self._lock:
                if self._closed:
                    _drop_group(pg)
                    return
                self._pending_free.clear()   # a (re)joined drafter starts with an empty cache
                self._last_ok_s = time.monotonic()
                self._store, self._pg = store, pg
                self.num_connects += 1
                self.last_error = None
            log.info("drafter group connected", extra={"backend": self.backend, "host": host,
                                                        "port": store.port, "generation": self.num_connects})

    def _drop(self) -> None:
        pg, self._pg = self._pg, None
        _drop_group(pg)
        self._store = None

    def _degrade(self, error: Exception) -> None:
        self.last_error = f"{type(error).__name__}: {str(error)[:200]}"
        log.warning("drafter link degraded: decoding without drafts until a drafter joins",
                    extra={"error": self.last_error})
        with self._lock:
            self._drop()
        self._ensure_reconnecting()

    def _ensure_reconnecting(self) -> None:
        if self._closed or self._pg is not None:
            return
        with self._lock:   # never held for long (connect waits under _connect_lock)
            if self._reconnector is not None and self._reconnector.is_alive():
                return
            self._reconnector = threading.Thread(target=self._reconnect_loop, name="dflash-drafter-reconnect",
                                                 daemon=True)
            self._reconnector.start()

    def _reconnect_loop(self) -> None:
        while not self._closed and self._pg is None:
            try:
                self.connect()
                return
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {str(e)[:200]}"
                log.warning("cannot reach the drafter", extra={"error": self.last_error})
            time.sleep(self.retry_interval_s)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            if self._pg is not None:
                try:
                    self._send(self._pg, _op_header(OP_CLOSE))
                except Exception:
                    pass
            self._drop()

    def heartbeat(self) -> bool:
        """Ping an idle link (engine thread, between steps): a drafter that died or hung
        while nothing drafted degrades the link here instead of on the next draft."""
        pg = self._pg
        if pg is None:
            self._ensure_reconnecting()
            return False
        if time.monotonic() - self._last_ok_s < self.heartbeat_s:
            return True
        try:
            self._send(pg, _op_header(OP_PING))
            self._recv(pg, torch.empty(1, dtype=torch.int64, device=self.comm_device))
            self._last_ok_s = time.monotonic()
            return True
        except Exception as e:
            self._degrade(e)
            return False

    # ---- DraftBackend ----------------------------------------------------------------
    def free(self, slot: int) -> None:
        if self._pg is not None:      # a drafter that joins later starts empty anyway
            self._pending_free[int(slot)] = None

    def draft(self, ctx_slots, ctx_positions, ctx_features, slots, block_emb, block_positions):
        # ctx_* [N], [N], [N, F]; slots [R]; block_emb [R, B, H]; block_positions [R, B] -> [R, B, H]
        pg = self._pg
        if pg is not None:
            try:
                return self._exchange(pg, ctx_slots, ctx_positions, ctx_features, slots, block_emb,
                                      block_positions)
            except Exception as e:
                self._degrade(e)
        else:
            self._ensure_reconnecting()
        # no drafter: zero hidden states give drafts the verify step rejects (output stays exact)
        self.num_failed_steps += 1
        return torch.zeros(block_emb.shape, dtype=block_emb.dtype, device=block_emb.device)

    def _send(self, pg, t: torch.Tensor) -> None:
        pg.send([t.to(self.comm_device).contiguous()], 1, 0).wait()
        self.bytes_sent += t.numel() * t.element_size()

    def _recv(self, pg, t: torch.Tensor) -> torch.Tensor:
        pg.recv([t], 1, 0).wait()   # bounded by the group's timeout (step_timeout_s)
        self.bytes_received += t.numel() * t.element_size()
        return t

    def _exchange(self, pg, ctx_slots, ctx_positions, ctx_features, slots, block_emb, block_positions):
        R, B, H = block_emb.shape
        N = int(ctx_slots.shape[0])
        dtype = block_emb.dtype
        kind = CTX_KV if self.context_drafter is not None else CTX_FEATURES
        context = self.context_drafter.context_kv(ctx_features).reshape(N, -1) if kind == CTX_KV and N \
            else ctx_features
        F = int(context.shape[-1]) if N else 0
        cd = self.comm_device
        free = torch.tensor(list(self._pending_free), dtype=torch.int64)
        header = torch.tensor([OP_DRAFT, len(free), N, R, B, F, H, WIRE_DTYPES.index(dtype), kind],
                              dtype=torch.int64)
        ints = torch.cat([free, ctx_slots.long().cpu(), ctx_positions.long().cpu(), slots.long().cpu(),
                          block_positions.long().cpu().reshape(-1)])
        floats = torch.cat([context.to(dtype).reshape(-1).to(cd), block_emb.reshape(-1).to(cd)])
        self._send(pg, header)
        self._send(pg, ints)
        self._send(pg, floats)
        out = self._recv(pg, torch.empty(R, B, H, dtype=dtype, device=cd))
        self.num_steps += 1
        self._pending_free.clear()
        self._last_ok_s = time.monotonic()
        return out.to(block_emb.device)


STALE_JOIN_TIMEOUT_S = 10.0


class DrafterServer:
    """Drafter side (rank 1): a LocalDraftBackend served over the group, one step per message."""

    def __init__(self, drafter, max_slots: int, capacity: int):
        from dflash_core.drafter import LocalDraftBackend
        self.drafter = drafter
        self.max_slots = max_slots
        self.capacity = capacity
        self.backend = LocalDraftBackend(drafter, max_slots, capacity)
        self.device = drafter.fc.weight.device
        self.generation = 0
        self.num_steps = 0
        self._pg = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def context_state(self) -> dict:
        """The weights that turn target features into this drafter's context K/V: a target
        holding them streams K/V instead of features (`RemoteDraftBackend(context_drafter=)`)."""
        return self.drafter.context_state()

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, host: str, port: int, backend: str = "gloo", timeout_s: float = 60.0) -> int:
        """Join the target's group as rank 1 (blocks until the group is formed), reset the
        context cache (a new target has new slots), serve steps on a thread. -> generation."""
        with self._lock:
            self.generation += 1
            gen = self.generation
            old, self._pg = self._pg, None
            _drop_group(old)   # the old serving thread's receive fails: it ends
            # the target's store listens before it asks us to join: a live one answers at
            # once. A join request that waited in the queue while this replica restarted (or
            # was stopped) may point at a store the target has given up on: fail fast, or
            # such stale requests (each holding the lock for the full timeout) would keep
            # every fresh one waiting longer than the target waits for it
            store = dist.TCPStore(host, int(port), world_size=2, is_master=False,
                                  timeout=timedelta(seconds=min(timeout_s, STALE_JOIN_TIMEOUT_S)))
            store.set(_READY_KEY, "1")
            # an idle drafter waits for the next step as long as it takes
            pg = _new_group(backend, store, 1, host, _GROUP_TIMEOUT)
            self.backend.cache.lens.zero_()
            comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            self._pg = pg
            self._thread = threading.Thread(target=self._serve, args=(gen, pg, comm), name="dflash-drafter-serve",
                                            daemon=True)
            self._thread.start()
            log.info("joined the target's group", extra={"host": host, "port": port, "generation": gen})
            return gen

    @torch.no_grad()
    def _serve(self, gen: int, pg, comm: torch.device) -> None:
        def recv(t):
            pg.recv([t], 0, 0).wait()
            return t

        try:
            while True:
                header = recv(torch.empty(HEADER_LEN, dtype=torch.int64, device=comm))
                op, n_free, N, R, B, F, H, code, kind = header.tolist()
                if op == OP_CLOSE:
                    return
                if op == OP_PING:
                    pg.send([torch.ones(1, dtype=torch.int64, device=comm)], 0, 0).wait()
                    continue
                dtype = WIRE_DTYPES[code]
                ints = recv(torch.empty(n_free + 2 * N + R + R * B, dtype=torch.int64, device=comm)).cpu()
                floats = recv(torch.empty(N * F + R * B * H, dtype=dtype, device=comm))
                free, ctx_slots, ctx_pos, slots, bpos = torch.split(ints, [n_free, N, N, R, R * B])
                for s in free.tolist():
                    self.backend.free(s)
                context = floats[:N * F].reshape(N, F).to(self.device)
                block_emb = floats[N * F:].reshape(R, B, H).to(self.device)
                if kind == CTX_KV:
                    kv = context.reshape(N, self.drafter.config.num_layers, 2, self.drafter.config.num_kv_heads,
                                         self.drafter.config.head_dim)
                    hidden = self.backend.draft(ctx_slots, ctx_pos, None, slots, block_emb, bpos.reshape(R, B),
                                                ctx_kv=kv)
                else:
                    hidden = self.backend.draft(ctx_slots, ctx_pos, context, slots, block_emb, bpos.reshape(R, B))
                pg.send([hidden.to(device=comm, dtype=dtype).contiguous()], 0, 0).wait()
                self.num_steps += 1
        except Exception as e:   # the target went away or rebuilt the group
            log.info("drafter group closed", extra={"generation": gen, "reason": f"{type(e).__name__}: {str(e)[:120]}"})
        finally:
            with self._lock:
                if self._pg is pg:
                    self._pg = None
                    _drop_group(pg)


# ---- what goes over the wire ----------------------------------------------------------

def step_wire_bytes(n_ctx: int, rows: int, block: int, feat_dim: int, hidden: int, elem: int = 2,
                    n_free: int = 0) -> tuple[int, int]:
    """Bytes of one draft step in the wire format above -> (target -> drafter, reply)."""
    sent = HEADER_LEN * 8 + (n_free + 2 * n_ctx + rows + rows * block) * 8 + (n_ctx * feat_dim + rows * block * hidden) * elem
    return sent, rows * block * hidden * elem


def wire_table(tau: float = 1.3, elem: int = 2) -> str:
    """Markdown: bytes per committed token and per step (one row) for the fused context
    features (transport_context "features") and for the drafter's own context K/V ("kv",
    the default), for the shipped drafter's shapes and for the public Qwen3-8B DFlash
    drafter's."""
    shapes = [  # name, target layers fused, target hidden, drafter layers, kv heads, head dim, block
        ("shipped (SmolLM2-135M target, 1 drafter layer)", 3, 576, 1, 3, 64, 16),
        ("Qwen3-8B DFlash (5 target layers of 4096, 5 drafter layers)", 5, 4096, 5, 8, 128, 16),
    ]
    out = ["| shapes | context per committed token: features / drafter K/V | one step, one row, at tau "
           f"{tau}: features / K/V (sent + reply) | context share of a step (features) |", "|---|---|---|---|"]
    for name, k, h, layers, kv, hd, block in shapes:
        feat = k * h * elem
        kvb = layers * 2 * kv * hd * elem
        sent, reply = step_wire_bytes(0, 1, block, 0, h, elem)
        base = sent + reply           # header, the block (ids, positions, embeddings), its reply
        step_feat = base + tau * (feat + 16)   # + per token: its context vector, slot, position
        step_kv = base + tau * (kvb + 16)
        out.append(f"| {name} | {feat:,} B / {kvb:,} B ({feat / kvb:.1f}x fewer) | {step_feat:,.0f} B / "
                   f"{step_kv:,.0f} B ({step_feat / step_kv:.2f}x fewer) | {tau * feat / step_feat:.0%} |")
    return "\n".join(out)


if __name__ == "__main__":   # python -m service.transport: the bytes table of docs/BENCHMARKS.md
    print(wire_table())
