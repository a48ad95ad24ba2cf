"""Every code block of README.md runs as written, so the docs cannot rot.

- python blocks run in a fresh interpreter;
- the `dflash serve` block is started as a real server (its port swapped for a free
  one), the curl block runs against it, then Ctrl-C (SIGINT) must stop it cleanly;
- every other bash block runs with `bash -e` from the repository root;
- a block may be skipped only with a `<!-- readme-test: skip (reason) -->` line right
  above it, and the reason must be given.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?P<pre>(?:<!--[^\n]*-->\n)?)```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.S)
SKIP = re.compile(r"<!-- readme-test: skip \((?P<why>[^)]+)\) -->")


def blocks() -> list[dict]:
    out = []
    for m in BLOCK.finditer((ROOT / "README.md").read_text()):
        skip = SKIP.search(m.group("pre"))
        out.append({"lang": m.group("lang"), "body": m.group("body"), "skip": skip.group("why") if skip else None})
    return out


def env() -> dict:
    e = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    e["PATH"] = venv_bin + os.pathsep + e.get("PATH", "")
    e.setdefault("RAY_AUTH_MODE", "disabled")
    return e


def test_readme_blocks_are_classified():
    bs = blocks()
    assert len(bs) >= 5
    assert all(b["lang"] in ("bash", "python") for b in bs), [b["lang"] for b in bs]
    assert all(len(b["skip"].strip()) > 10 for b in bs if b["skip"])      # a skip says why
    assert sum(1 for b in bs if b["skip"]) <= 1
    assert sum(1 for b in bs if "dflash serve" in b["body"] and not b["skip"]) == 1
    assert sum(1 for b in bs if "curl " in b["body"]) == 1


@pytest.mark.parametrize("i", [i for i, b in enumerate(blocks()) if b["lang"] == "python"])
def test_python_block_runs(i):
    r = subprocess.run([sys.executable, "-c", blocks()[i]["body"]], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()


def _plain_bash_blocks():
    return [i for i, b in enumerate(blocks()) if b["lang"] == "bash" and not b["skip"]
            and "dflash serve" not in b["body"] and "curl " not in b["body"]]


@pytest.mark.slow
@pytest.mark.parametrize("i", _plain_bash_blocks())
def test_bash_block_runs(i):
    r = subprocess.run(["bash", "-e", "-c", blocks()[i]["body"]], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-2500:])


@pytest.mark.slow
def test_serve_then_curl_then_ctrl_c():
    from service.local import free_port
    bs = blocks()
    serve = next(b["body"] for b in bs if "dflash serve" in b["body"] and not b["skip"])
    curl = next(b["body"] for b in bs if "curl " in b["body"])
    port = free_port()
    assert "--port 8000" in serve and "127.0.0.1:8000" in curl
    serve, curl = serve.replace("--port 8000", f"--port {port}"), curl.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    interrupted = False
    proc = subprocess.Popen(["bash", "-c", "exec " + serve.strip()], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the README's server did not become healthy in 300 s")
        r = subprocess.run(["bash", "-e", "-c", curl], cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-1500:])
        assert '"chat.completion"' in r.stdout and "data: [DONE]" in r.stdout
        assert "dflash_spec_decode" in r.stdout
        # Ctrl-C (SIGINT to the whole process group, as a terminal sends it) with a stream
        # in flight: the stream still ends with a finish_reason and [DONE]
        body = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                "stream": True}
        events, first = [], threading.Event()

        def stream():
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=300) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()
            first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(120)
        os.killpg(proc.pid, signal.SIGINT)
        interrupted = True
        t.join(180)
        assert not t.is_alive()
        assert events and events[-1] == "[DONE]", events[-3:]
        finish = [json.loads(e)["choices"][0].get("finish_reason") for e in events[:-1] if e.startswith("{")]
        assert finish and finish[-1] in ("length", "abort"), events[-3:]
    finally:
        if proc.poll() is None:
            if not interrupted:
                os.killpg(proc.pid, signal.SIGINT)      # what Ctrl-C sends
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail("the server did not stop within 120 s of SIGINT")
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]
    assert "shutting down" in out
    assert "Traceback" not in out and "ActorDiedError" not in out, out[-3000:]
