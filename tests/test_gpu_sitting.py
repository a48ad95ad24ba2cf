"""deploy/gpu/sitting.sh, the prepared drafter training sitting for a lent GPU machine,
run here on the CPU with tiny settings: the target travels in parts that each fit one
transfer beside the working tree, is put back together bit for bit (a wrong part is
refused), and the train phase writes a loadable drafter and its log into $OUT."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "gpu" / "sitting.sh"
TRANSFER_LIMIT = 64 * 2**20     # the device tool's working-tree limit per call


def _run(phase, tmp_path, check=True, phase_arg=None, **env):
    e = dict(os.environ, PY=sys.executable, GPU_DIR=str(tmp_path / "gpu"), STAGE_DIR=str(tmp_path / "stage"),
             NO_WHEEL="1")
    e.update(env)
    argv = ["bash", str(SCRIPT), phase] + ([phase_arg] if phase_arg else [])
    r = subprocess.run(argv, cwd=ROOT, env=e, capture_output=True, text=True, timeout=900)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_bytes() -> int:
    """What travels with every call: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / p.decode()).stat().st_size for p in out if p and (ROOT / p.decode()).is_file())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from dflash_core.models.loader import default_gguf_path
    tmp = tmp_path_factory.mktemp("sitting")
    _run("prepare", tmp)
    return tmp, default_gguf_path()


def test_the_target_travels_in_parts_that_fit_and_join_bit_for_bit(prepared, tmp_path):
    tmp, gguf = prepared
    parts = sorted((tmp / "gpu").glob("part-*/gguf.part"), key=lambda p: int(p.parent.name[5:]))
    assert len(parts) == 3   # PARTS default
    assert sum(p.stat().st_size for p in parts) == gguf.stat().st_size
    tree = _tree_bytes()
    for p in parts:   # each call carries one part beside the working tree (the data folders grow)
        assert tree + p.stat().st_size + 2**20 < TRANSFER_LIMIT, (tree, p.stat().st_size)
    assert [p.name for p in (tmp / "gpu").glob("part-*/gguf.sha256")] == ["gguf.sha256"]
    assert (tmp / "gpu" / "part-3" / "gguf.sha256").exists()   # carried by the train call
    for k in (1, 2):
        r = _run("stage", tmp, phase_arg=str(k))
        assert f"staged part {k}" in r.stdout
    _run("join", tmp)
    assert _sha(tmp / "stage" / gguf.name) == _sha(gguf)
    # a part that is not the one prepared is refused by the checksum
    bad = tmp_path / "bad"
    (bad / "part-3").mkdir(parents=True)
    data = bytearray(parts[2].read_bytes())
    data[12345] ^= 1
    (bad / "part-3" / "gguf.part").write_bytes(bytes(data))
    (bad / "part-3" / "gguf.sha256").write_text((tmp / "gpu" / "part-3" / "gguf.sha256").read_text())
    r = _run("join", tmp, check=False, GPU_DIR=str(bad))
    assert r.returncode != 0 and "FAILED" in (r.stdout + r.stderr)
    # without a staged part (the machine went back between the calls) join says which
    r = _run("join", tmp_path, check=False, GPU_DIR=str(tmp / "gpu"))
    assert r.returncode == 3 and "run stage again" in r.stderr and "part-1" in r.stderr
    (tmp_path / "stage").mkdir(exist_ok=True)
    (tmp_path / "stage" / "part-1").write_bytes(parts[0].read_bytes())
    r = _run("join", tmp_path, check=False, GPU_DIR=str(tmp / "gpu"))
    assert r.returncode == 3 and "part-2" in r.stderr
    # a part that was not carried, or a bad PARTS, is named
    r = _run("stage", tmp, check=False, phase_arg="7")
    assert r.returncode == 2 and "carry .gpu/part-7" in r.stderr
    r = _run("prepare", tmp_path, check=False, PARTS="1")
    assert r.returncode == 2 and "PARTS" in r.stderr


def test_train_phase_writes_a_loadable_drafter_and_its_log(prepared, tmp_path):
    import torch
    from dflash_core.drafter import DFlashDrafter
    tmp, _ = prepared
    out = tmp_path / "out"
    from dflash_core.runtime import cache_root
    _run("train", tmp, OUT=str(out), TARGET="default", DEVICE="cpu", SEQS="2", BLOCKS="2", BUDGET="1",
         DFLASH_CACHE=str(cache_root()),   # the converted default target the other tests use
         STAGE_DIR=str(tmp_path / "stage"), DATA=str(ROOT / "data" / "sharegpt-smollm2-135m"),
         EVAL_DATA="", DISTILL="0.5", WALK_WEIGHT="1")   # held-out evaluation in training: tests/test_training.py
    summary = json.loads(next(x for x in (out / "env.txt").read_text().splitlines() if x.startswith('{"out"')))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert summary["step"] == log[-1]["step"] >= 1 and "steps_planned" in log[-1]
    config = json.loads((out / "train_config.json").read_text())
    assert config["distill"] == 0.5 and config["walk_weight"] == 1.0
    meta = json.loads((out / "drafter" / "meta.json").read_text())
    assert meta["step"] == summary["step"] and meta["tokens_seen"] == log[-1]["tokens_seen"] > 0
    returned = [p for p in out.rglob("*") if p.is_file()]
    assert len(returned) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in returned)   # what may come back
    d = DFlashDrafter.load(out / "drafter")
    assert d.config.block_size == 8 and len(d.config.draft_vocab) >= 8192
    assert json.loads((out / "drafter" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # it trained from the shipped drafter: same shape, weights moved by the step(s)
    shipped = DFlashDrafter.load("dflash_core/assets/drafter-smollm2-135m")
    assert d.fc.weight.shape == shipped.fc.weight.shape
    assert not torch.equal(d.fc.weight, shipped.fc.weight)
    assert json.loads((out / "train_config.json").read_text())["seqs_per_step"] == 2
    assert json.loads((out / "train_config.json").read_text())["distill"] == 0.5


def test_a_failed_training_says_so_and_exits_nonzero(prepared, tmp_path):
    tmp, _ = prepared
    r = _run("train", tmp, check=False, OUT=str(tmp_path / "out"), TARGET="default", DEVICE="no-such-device",
             EVAL_DATA="", STAGE_DIR=str(tmp_path / "stage"))
    assert r.returncode != 0 and "before its first checkpoint" in r.stderr and "no-such-device" in r.stderr
    assert (tmp_path / "out" / "env.txt").exists() and not (tmp_path / "out" / "drafter").exists()
