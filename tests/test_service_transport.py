"""RemoteDraftBackend <-> DrafterServer over a real gloo group with a drafter process (no
Ray): the remote backend returns exactly what the colocated LocalDraftBackend returns,
through slot frees and reuse; it degrades within its step timeout when the drafter dies
or hangs, and reconnects in the background when a drafter is back."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from dflash_core.api import tiny_random_config
from dflash_core.drafter import DFlashDrafter, LocalDraftBackend

MAX_SLOTS, CAPACITY, BLOCK = 3, 64, 8


def make_drafter() -> DFlashDrafter:
    """Packed for inference, as every drafter the engine and the drafter deployment load is
    (api.load_drafter), so the context K/V a target computes with `context_only` (packed
    too) are those the colocated drafter computes, bit for bit."""
    return DFlashDrafter.from_target(tiny_random_config(), num_layers=1, block_size=BLOCK, mask_token_id=16,
                                     num_features=3, seed=0).pack_weights()


def drafter_process(requests, replies, num_threads):
    """Rank 1: join whenever asked (a new group each time), until told to stop."""
    torch.set_num_threads(num_threads)   # the same reduction order as the colocated reference
    from service.transport import DrafterServer
    server = DrafterServer(make_drafter(), MAX_SLOTS, CAPACITY)
    replies.put(("started", None))       # imports and the drafter built: ready to be asked
    while True:
        msg = requests.get()
        if msg is None:
            return
        host, port = msg
        try:
            replies.put((port, server.join(host, port, "gloo", 30.0)))
        except Exception as e:   # a stale request (its target gave up): answer, go on
            replies.put((port, e))


class DrafterProc:
    def __init__(self):
        ctx = mp.get_context("spawn")
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=drafter_process, args=(self.requests, self.replies, torch.get_num_threads()),
                                daemon=True)
        self.proc.start()
        # the tests time the link, not the child's start-up (importing torch can take
        # seconds on a loaded 2-core machine, more than a short connect timeout)
        assert self.replies.get(timeout=120) == ("started", None)

    def request_join(self, host, port):
        self.requests.put((host, port))

        def wait():
            while True:   # skip the answers to stale requests
                got_port, result = self.replies.get(timeout=60)
                if got_port == port:
                    if isinstance(result, Exception):
                        raise result
                    return result
        return wait


def stop(pid: int) -> None:
    """SIGSTOP, and wait until the kernel shows the process stopped."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "Tt", 10,
               "the drafter to stop")


def wait_until(pred, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


def step_inputs(gen, slots, lens, new_tokens, F, H):
    """Context features for `new_tokens` more committed tokens per slot, then a block per slot."""
    ctx_slots, ctx_pos = [], []
    for s in slots:
        ctx_slots += [s] * new_tokens
        ctx_pos += list(range(lens[s], lens[s] + new_tokens))
        lens[s] += new_tokens
    N = len(ctx_slots)
    feats = torch.randn(N, F, generator=gen)
    block_emb = torch.randn(len(slots), BLOCK, H, generator=gen)
    block_pos = torch.tensor([[lens[s] - 1 + k for k in range(BLOCK)] for s in slots])
    return (torch.tensor(ctx_slots, dtype=torch.int64), torch.tensor(ctx_pos, dtype=torch.int64), feats,
            torch.tensor(slots, dtype=torch.int64), block_emb, block_pos)


@pytest.mark.parametrize("context", ["kv", "features"])
def test_remote_backend_equals_local_through_frees_and_restart(context):
    """Both wire formats of the context (the drafter's K/V computed on the target side, or
    the target's fused features) give exactly the colocated drafts; K/V are fewer bytes."""
    from service.transport import RemoteDraftBackend, step_wire_bytes
    drafter = make_drafter()
    cfg = drafter.config
    F, H = len(cfg.target_layer_ids) * cfg.hidden_size, cfg.hidden_size
    local = LocalDraftBackend(drafter, MAX_SLOTS, CAPACITY)
    proc = DrafterProc()
    context_drafter = DFlashDrafter.context_only(cfg, drafter.context_state()) if context == "kv" else None
    wire_F = drafter.context_kv_dim if context == "kv" else F
    if context == "kv":
        assert wire_F * 3 == F    # 64 vs 192 values per token for these tiny shapes (shipped: 384 vs 1728)
    remote = RemoteDraftBackend(cfg, lambda h, p: proc.request_join(h, p), backend="gloo", timeout_s=60.0,
                                retry_interval_s=0.0, host="127.0.0.1", context_drafter=context_drafter)
    gen = torch.Generator().manual_seed(0)
    lens = {s: 0 for s in range(MAX_SLOTS)}
    try:
        remote.connect()
        # steps over changing rows; slot 1 is freed and reused by a new sequence
        plan = [([0, 1], 5), ([0, 1, 2], 2), ([0, 2], 3), ("free", 1), ([1, 2], 6), ([0, 1, 2], 1)]
        sent = received = frees = 0
        for item in plan:
            if item[0] == "free":
                local.free(item[1])
                remote.free(item[1])
                lens[item[1]] = 0
                frees += 1
                continue
            args = step_inputs(gen, item[0], lens, item[1], F, H)
            want = local.draft(*args)
            got = remote.draft(*args)
            assert got.shape == want.shape == (len(item[0]), BLOCK, H)
            assert torch.equal(got, want)
            s, r = step_wire_bytes(len(item[0]) * item[1], len(item[0]), BLOCK, wire_F, H,
                                   elem=args[4].element_size(), n_free=frees)
            sent, received, frees = sent + s, received + r, 0
        assert remote.num_connects == 1 and remote.num_failed_steps == 0
        # the byte counters (and docs/BENCHMARKS.md's table) follow the wire format exactly
        assert (remote.bytes_sent, remote.bytes_received, remote.num_steps) == (sent, received, 5)

        # the drafter process dies: the step fails over to zeros (drafts the verify rejects)
        # and the link reports itself degraded (the engine then decodes plainly)
        remote.timeout_s = 3.0          # how long a reconnect waits for a drafter to join
        proc.proc.kill()
        proc.proc.join()
        args = step_inputs(gen, [0], lens, 1, F, H)
        local.draft(*args)
        out = remote.draft(*args)
        assert remote.num_failed_steps == 1 and torch.count_nonzero(out) == 0 and not remote.connected
        assert remote.state == "degraded" and remote.last_error

        # a new drafter process: the background reconnect joins it; with a fresh cache on
        # both sides (new sequences) the outputs are identical again
        proc = DrafterProc()
        wait_until(lambda: remote.available, 60, "the reconnect to the new drafter")
        local = LocalDraftBackend(drafter, MAX_SLOTS, CAPACITY)
        lens = {s: 0 for s in range(MAX_SLOTS)}
        for slots, n in (([0, 2], 4), ([0, 1, 2], 3)):
            args = step_inputs(gen, slots, lens, n, F, H)
            assert torch.equal(remote.draft(*args), local.draft(*args))
        assert remote.num_connects == 2 and remote.connected and remote.state == "connected"
    finally:
        remote.close()
        proc.requests.put(None)
        proc.proc.join(timeout=30)
        if proc.proc.is_alive():
            proc.proc.kill()


def test_hung_drafter_degrades_within_the_step_timeout_and_comes_back():
    """SIGSTOP the drafter: the step returns within the step timeout (not the 60 s connect
    timeout), the link is degraded, the heartbeat of an idle link notices a hang too, and
    after SIGCONT a background reconnect brings drafts back, equal to the local backend's."""
    from service.transport import RemoteDraftBackend
    drafter = make_drafter()
    cfg = drafter.config
    F, H = len(cfg.target_layer_ids) * cfg.hidden_size, cfg.hidden_size
    proc = DrafterProc()
    remote = RemoteDraftBackend(cfg, lambda h, p: proc.request_join(h, p), backend="gloo", timeout_s=3.0,
                                retry_interval_s=0.2, host="127.0.0.1", step_timeout_s=1.0, heartbeat_s=0.0)
    gen = torch.Generator().manual_seed(1)
    lens = {s: 0 for s in range(MAX_SLOTS)}
    try:
        remote.connect()
        local = LocalDraftBackend(drafter, MAX_SLOTS, CAPACITY)
        args = step_inputs(gen, [0, 1], lens, 3, F, H)
        assert torch.equal(remote.draft(*args), local.draft(*args))
        assert remote.heartbeat()                              # an answering drafter: link up

        stop(proc.proc.pid)                                    # hung, not dead: sockets stay open
        args = step_inputs(gen, [0, 1], lens, 1, F, H)
        t0 = time.monotonic()
        out = remote.draft(*args)
        took = time.monotonic() - t0
        assert took < 1.0 + 2.0, f"a hung drafter held the step for {took:.1f} s"
        assert torch.count_nonzero(out) == 0 and not remote.available and remote.state == "degraded"
        assert remote.num_failed_steps == 1
        for s in range(MAX_SLOTS):                              # frees while degraded do not pile up
            remote.free(s)
        assert not remote._pending_free

        os.kill(proc.proc.pid, signal.SIGCONT)                 # back: reconnects in the background
        wait_until(lambda: remote.available, 60, "the reconnect after SIGCONT")
        assert remote.num_connects == 2
        local = LocalDraftBackend(drafter, MAX_SLOTS, CAPACITY)   # the rejoined drafter starts empty
        lens = {s: 0 for s in range(MAX_SLOTS)}
        args = step_inputs(gen, [2], lens, 2, F, H)
        assert torch.equal(remote.draft(*args), local.draft(*args))

        # a hang while the link is idle: the heartbeat notices it within the step timeout
        stop(proc.proc.pid)
        t0 = time.monotonic()
        assert remote.heartbeat() is False
        assert time.monotonic() - t0 < 1.0 + 2.0 and remote.state == "degraded"
        os.kill(proc.proc.pid, signal.SIGCONT)
        wait_until(lambda: remote.available, 60, "the reconnect after the idle hang")
        assert remote.num_connects == 3
    finally:
        try:
            os.kill(proc.proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        remote.close()
        proc.requests.put(None)
        proc.proc.join(timeout=30)
        if proc.proc.is_alive():
            proc.proc.kill()
