"""Locust at concurrency 1/4/16 against 1 and 2 replicas of the colocated app on a
simulated two-node Ray cluster (two raylets on 127.0.0.1, one CPU each), default model,
speculation as the default schedule serves it. docs/BENCHMARKS.md ("Replicas").

    .venv/bin/python -m loadtest.replicas runs/bench/replicas
"""
import os
import subprocess
import sys
import time


def main(out: str) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # one proxy for two nodes: let it route to the replica on the other node too
    os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    import ray
    import ray._private.services as services
    from ray import serve
    from ray.cluster_utils import Cluster

    from service.deployments import build_app
    from service.local import free_port

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    services.resolve_ip_for_localhost = lambda h: h
    ray.init(address=c.address, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    url = f"http://127.0.0.1:{port}"
    try:
        for n in (1, 2):
            args = {"target": "default", "drafter": "default", "max_slots": 8, "max_seq_len": 1024, "num_cpus": 0.6,
                    "served_model_name": "smollm2", "log_level": "WARNING",
                    "autoscaling": {"min_replicas": n, "max_replicas": n}}
            serve.run(build_app(args), name="dflash", route_prefix="/")
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "loadtest.run", "--host", url, "--concurrency", "1,4,16",
                                "--duration", "20s", "--modes", "on", "--max-tokens", "64", "--out", f"{out}/replicas{n}"],
                               capture_output=True, text=True)
            print(f"replicas={n} rc={r.returncode} {time.time() - t0:.0f}s", r.stdout[-1500:], r.stderr[-800:], flush=True)
            serve.delete("dflash")
    finally:
        serve.shutdown(); ray.shutdown(); c.shutdown()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "loadtest/results/replicas")
