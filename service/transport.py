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
- Failure: if a send/receive fails (the drafter replica died or restarted), the target
  side rebuilds the group through `request_join` and retries the step once. The new
  drafter has lost the context of running requests, so their drafts get worse, but the
  verify step keeps the output exact. If no drafter can be reached the backend returns
  zero hidden states (drafts the verify rejects): decoding continues, exact and slower,
  and reconnection is retried every `retry_interval_s`.

Wire format of one step (rank 0 -> rank 1, three messages, then one reply):
  header int64[8]   = [op, n_free, N, R, B, F, H, dtype code]
  ints   int64[...] = [free slots (n_free) | ctx_slots (N) | ctx_positions (N) | slots (R) | block_positions (R*B)]
  floats dtype[...] = [ctx_features (N*F) | block_emb (R*B*H)]
  reply  dtype[R, B, H] = drafter hidden states (final norm applied)
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

OP_DRAFT, OP_CLOSE = 1, 2
HEADER_LEN = 8
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


def _close_group() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a half-broken group: nothing more to release
            log.warning("destroying the process group failed", exc_info=True)


class RemoteDraftBackend:
    """Target side (rank 0). `config` is the drafter's DrafterConfig (block size, mask id,
    target layer ids), fetched from the drafter side by the caller."""

    def __init__(self, config, request_join, device: str = "cpu", backend: str = "auto",
                 timeout_s: float = 60.0, retry_interval_s: float = 5.0, host: str | None = None):
        """request_join(host, port) -> wait(): makes the drafter side call DrafterServer.join;
        backend: "gloo" | "nccl" (resolve "auto" with comm_backend first)."""
        self.config = config
        self.request_join = request_join
        self.device = torch.device(device)
        self.backend = comm_backend(device, backend)
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self.host = host
        self.connected = False
        self.num_connects = 0
        self.num_failed_steps = 0
        self._pending_free: list[int] = []
        self._store = None
        self._last_attempt_s = -1e9
        self._lock = threading.Lock()

    # ---- group lifecycle -------------------------------------------------------------
    def connect(self) -> None:
        """(Re)build the group: open a store, ask the drafter to join, join as rank 0."""
        with self._lock:
            self._last_attempt_s = time.monotonic()
            self.connected = False
            _close_group()
            host = self.host or transport_host()
            store = dist.TCPStore(host, 0, world_size=2, is_master=True,
                                  timeout=timedelta(seconds=self.timeout_s), wait_for_workers=False)
            wait_joined = self.request_join(host, store.port)
            # the drafter marks the store before joining the group: wait for that mark with a
            # bounded timeout, so an absent drafter fails here instead of blocking the group
            # rendezvous (which runs under the long group timeout)
            store.wait([_READY_KEY], timedelta(seconds=self.timeout_s))
            dist.init_process_group(self.backend, store=store, rank=0, world_size=2, timeout=_GROUP_TIMEOUT)
            wait_joined()
            self._store = store
            self._pending_free.clear()   # a (re)joined drafter starts with an empty cache
            self.connected = True
            self.num_connects += 1
            log.info("drafter group connected", extra={"backend": self.backend, "host": host,
                                                        "port": store.port, "generation": self.num_connects})

    def close(self) -> None:
        with self._lock:
            if self.connected:
                try:
                    dist.send(torch.tensor([OP_CLOSE] + [0] * (HEADER_LEN - 1), device=self.comm_device), 1)
                except Exception:
                    pass
            self.connected = False
            _close_group()

    # ---- DraftBackend ----------------------------------------------------------------
    def free(self, slot: int) -> None:
        self._pending_free.append(int(slot))

    def draft(self, ctx_slots, ctx_positions, ctx_features, slots, block_emb, block_positions):
        # ctx_* [N], [N], [N, F]; slots [R]; block_emb [R, B, H]; block_positions [R, B] -> [R, B, H]
        for attempt in range(2):
            if not self.connected:
                if attempt == 0 and time.monotonic() - self._last_attempt_s < self.retry_interval_s:
                    break
                try:
                    self.connect()
                except Exception as e:
                    log.warning("cannot reach the drafter", extra={"error": f"{type(e).__name__}: {e}"})
                    _close_group()
                    break
            try:
                return self._exchange(ctx_slots, ctx_positions, ctx_features, slots, block_emb, block_positions)
            except Exception as e:
                log.warning("draft exchange failed; rebuilding the group",
                            extra={"error": f"{type(e).__name__}: {str(e)[:200]}"})
                self.connected = False
                self._last_attempt_s = -1e9   # retry at once
                _close_group()
        # no drafter: zero hidden states give drafts the verify step rejects (output stays exact)
        self.num_failed_steps += 1
        return torch.zeros(block_emb.shape, dtype=block_emb.dtype, device=block_emb.device)

    def _exchange(self, ctx_slots, ctx_positions, ctx_features, slots, block_emb, block_positions):
        R, B, H = block_emb.shape
        N = int(ctx_slots.shape[0])
        F = int(ctx_features.shape[-1]) if N else 0
        dtype = block_emb.dtype
        cd = self.comm_device
        free = torch.tensor(self._pending_free, dtype=torch.int64)
        header = torch.tensor([OP_DRAFT, len(free), N, R, B, F, H, WIRE_DTYPES.index(dtype)], dtype=torch.int64)
        ints = torch.cat([free, ctx_slots.long().cpu(), ctx_positions.long().cpu(), slots.long().cpu(),
                          block_positions.long().cpu().reshape(-1)])
        floats = torch.cat([ctx_features.to(dtype).reshape(-1).to(cd), block_emb.reshape(-1).to(cd)])
        dist.send(header.to(cd), 1)
        dist.send(ints.to(cd), 1)
        dist.send(floats.contiguous(), 1)
        out = torch.empty(R, B, H, dtype=dtype, device=cd)
        work = dist.irecv(out, 1)
        if not work.wait(timeout=timedelta(seconds=self.timeout_s)):
            raise RuntimeError("no reply from the drafter")
        self._pending_free.clear()
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
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, host: str, port: int, backend: str = "gloo", timeout_s: float = 60.0) -> int:
        """Join the target's group as rank 1 (blocks until the group is formed), reset the
        context cache (a new target has new slots), serve steps on a thread. -> generation."""
        with self._lock:   # from here on the old serving thread must not close the group
            old = self._thread
            self.generation += 1
            gen = self.generation
        if old is not None and old.is_alive():
            old.join(timeout=min(5.0, timeout_s))   # its peer is gone: its recv fails soon
        with self._lock:
            _close_group()
            # the target's store listens before it asks us to join: a live one answers at
            # once. A join request that waited in the queue while this replica restarted may
            # point at a store the target has given up on: fail fast, or such stale requests
            # (each holding the lock for the full timeout) would keep every fresh one waiting
            # longer than the target waits for it
            store = dist.TCPStore(host, int(port), world_size=2, is_master=False,
                                  timeout=timedelta(seconds=min(timeout_s, STALE_JOIN_TIMEOUT_S)))
            store.set(_READY_KEY, "1")
            dist.init_process_group(backend, store=store, rank=1, world_size=2, timeout=_GROUP_TIMEOUT)
            self.backend.cache.lens.zero_()
            comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            self._thread = threading.Thread(target=self._serve, args=(gen, comm), name="dflash-drafter-serve",
                                            daemon=True)
            self._thread.start()
            log.info("joined the target's group", extra={"host": host, "port": port, "generation": gen})
            return gen

    @torch.no_grad()
    def _serve(self, gen: int, comm: torch.device) -> None:
        try:
            while True:
                header = torch.empty(HEADER_LEN, dtype=torch.int64, device=comm)
                dist.recv(header, 0)
                op, n_free, N, R, B, F, H, code = header.tolist()
                if op == OP_CLOSE:
                    return
                dtype = WIRE_DTYPES[code]
                ints = torch.empty(n_free + 2 * N + R + R * B, dtype=torch.int64, device=comm)
                dist.recv(ints, 0)
                floats = torch.empty(N * F + R * B * H, dtype=dtype, device=comm)
                dist.recv(floats, 0)
                ints = ints.cpu()
                free, ctx_slots, ctx_pos, slots, bpos = torch.split(ints, [n_free, N, N, R, R * B])
                for s in free.tolist():
                    self.backend.free(s)
                ctx_feats = floats[:N * F].reshape(N, F).to(self.device)
                block_emb = floats[N * F:].reshape(R, B, H).to(self.device)
                hidden = self.backend.draft(ctx_slots, ctx_pos, ctx_feats, slots, block_emb, bpos.reshape(R, B))
                dist.send(hidden.to(device=comm, dtype=dtype).contiguous(), 0)
                self.num_steps += 1
        except Exception as e:   # the target went away or rebuilt the group
            log.info("drafter group closed", extra={"generation": gen, "reason": f"{type(e).__name__}: {str(e)[:120]}"})
        finally:
            with self._lock:
                if self.generation == gen:
                    _close_group()
