"""RemoteDraftBackend <-> DrafterServer over a real gloo group with a drafter process (no
Ray): the remote backend returns exactly what the colocated LocalDraftBackend returns,
through slot frees and reuse, and reconnects to a restarted drafter."""
from __future__ import annotations

import multiprocessing as mp

import torch

from dflash_core.api import tiny_random_config
from dflash_core.drafter import DFlashDrafter, LocalDraftBackend

MAX_SLOTS, CAPACITY, BLOCK = 3, 64, 8


def make_drafter() -> DFlashDrafter:
    return DFlashDrafter.from_target(tiny_random_config(), num_layers=1, block_size=BLOCK, mask_token_id=16,
                                     num_features=3, seed=0)


def drafter_process(requests, replies, num_threads):
    """Rank 1: join whenever asked (a new group each time), until told to stop."""
    torch.set_num_threads(num_threads)   # the same reduction order as the colocated reference
    from service.transport import DrafterServer
    server = DrafterServer(make_drafter(), MAX_SLOTS, CAPACITY)
    while True:
        msg = requests.get()
        if msg is None:
            return
        host, port = msg
        replies.put(server.join(host, port, "gloo", 30.0))


class DrafterProc:
    def __init__(self):
        ctx = mp.get_context("spawn")
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=drafter_process, args=(self.requests, self.replies, torch.get_num_threads()),
                                daemon=True)
        self.proc.start()

    def request_join(self, host, port):
        self.requests.put((host, port))
        return lambda: self.replies.get(timeout=60)


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


def test_remote_backend_equals_local_through_frees_and_restart():
    from service.transport import RemoteDraftBackend, _close_group
    drafter = make_drafter()
    cfg = drafter.config
    F, H = len(cfg.target_layer_ids) * cfg.hidden_size, cfg.hidden_size
    local = LocalDraftBackend(drafter, MAX_SLOTS, CAPACITY)
    proc = DrafterProc()
    remote = RemoteDraftBackend(cfg, lambda h, p: proc.request_join(h, p), backend="gloo", timeout_s=60.0,
                                retry_interval_s=0.0, host="127.0.0.1")
    gen = torch.Generator().manual_seed(0)
    lens = {s: 0 for s in range(MAX_SLOTS)}
    try:
        remote.connect()
        # steps over changing rows; slot 1 is freed and reused by a new sequence
        plan = [([0, 1], 5), ([0, 1, 2], 2), ([0, 2], 3), ("free", 1), ([1, 2], 6), ([0, 1, 2], 1)]
        for item in plan:
            if item[0] == "free":
                local.free(item[1])
                remote.free(item[1])
                lens[item[1]] = 0
                continue
            args = step_inputs(gen, item[0], lens, item[1], F, H)
            want = local.draft(*args)
            got = remote.draft(*args)
            assert got.shape == want.shape == (len(item[0]), BLOCK, H)
            assert torch.equal(got, want)
        assert remote.num_connects == 1 and remote.num_failed_steps == 0

        # the drafter process dies: the step fails over to zeros (drafts the verify rejects)
        remote.timeout_s = 3.0          # how long a reconnect waits for a drafter to join
        proc.proc.kill()
        proc.proc.join()
        args = step_inputs(gen, [0], lens, 1, F, H)
        local.draft(*args)
        out = remote.draft(*args)
        assert remote.num_failed_steps == 1 and torch.count_nonzero(out) == 0 and not remote.connected

        # a new drafter process: the next step rebuilds the group; with a fresh cache on
        # both sides (new sequences) the outputs are identical again
        proc = DrafterProc()
        remote.timeout_s = 60.0
        local = LocalDraftBackend(drafter, MAX_SLOTS, CAPACITY)
        lens = {s: 0 for s in range(MAX_SLOTS)}
        for slots, n in (([0, 2], 4), ([0, 1, 2], 3)):
            args = step_inputs(gen, slots, lens, n, F, H)
            assert torch.equal(remote.draft(*args), local.draft(*args))
        assert remote.num_connects == 2 and remote.connected
    finally:
        remote.close()
        proc.requests.put(None)
        proc.proc.join(timeout=30)
        if proc.proc.is_alive():
            proc.proc.kill()
        _close_group()
