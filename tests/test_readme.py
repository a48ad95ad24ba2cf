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


def serve_env() -> dict:
    """What a user's shell has: no Ray settings (the test suite's RAY_AUTH_MODE=disabled is
    for its in-process Ray clusters), so `dflash serve` runs with its own defaults."""
    return {k: v for k, v in env().items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}


def listeners(root_pid: int) -> list[tuple[str, int, str, int]]:
    """(ip, port, process name, pid) of every listening TCP socket of a process tree and of
    the sessions its processes run in (the supervised Ray driver has a session of its own)."""
    import psutil
    root = psutil.Process(root_pid)
    sids = {os.getsid(q.pid) for q in [root, *root.children(recursive=True)]}
    pids = set()
    for q in psutil.process_iter():
        try:
            if os.getsid(q.pid) in sids:
                pids.add(q.pid)
        except (ProcessLookupError, PermissionError):
            pass
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.Error:
                name = "?"
            out.append((c.laddr.ip, c.laddr.port, name, c.pid))
    return out


def check_control_plane_needs_a_token(root_pid: int, http_port: int) -> None:
    """The HTTP port listens on the loopback only (--host 127.0.0.1); Ray's GCS, which
    listens on every interface, refuses a call without the run's token (and answers with
    it: the refusal is about the token, not a broken call)."""
    import grpc
    import psutil
    socks = listeners(root_pid)
    assert {ip for ip, port, _, _ in socks if port == http_port} == {"127.0.0.1"}, socks
    gcs = [(port, pid) for ip, port, name, pid in socks if name == "gcs_server"]
    assert gcs, socks
    gcs_env = psutil.Process(gcs[0][1]).environ()
    assert gcs_env.get("RAY_AUTH_MODE") == "token"
    token = gcs_env["RAY_AUTH_TOKEN"]
    with grpc.insecure_channel(f"127.0.0.1:{gcs[0][0]}") as ch:
        call = ch.unary_unary("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for metadata in (None, [("authorization", "Bearer " + "0" * 64)]):
            with pytest.raises(grpc.RpcError) as e:
                call(b"", metadata=metadata, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert call(b"", metadata=[("authorization", "Bearer " + token)], timeout=30)


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
    proc = subprocess.Popen(["bash", "-c", "exec " + serve.strip()], cwd=ROOT, env=serve_env(), stdout=subprocess.PIPE,
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
        check_control_plane_needs_a_token(proc.pid, port)
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
