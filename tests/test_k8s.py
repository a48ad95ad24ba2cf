"""k8s/: manifests parse, the RayService validates against the KubeRay CRD schema, its Serve
config names this repository's real application (the one deploy/serve.yaml runs), and the
monitoring/dashboard refer to ports and metric names that exist."""
from __future__ import annotations

import copy
import importlib
import json
import os
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
K8S = REPO / "k8s"
# KubeRay's RayService CRD (ray.io_rayservices.yaml of a KubeRay release, controller-gen
# v0.16.5, gzipped in tests/schemas/; DFLASH_RAYSERVICE_CRD points at the one you deploy on)
CRD = Path(os.environ.get("DFLASH_RAYSERVICE_CRD", Path(__file__).parent / "schemas" / "ray.io_rayservices.yaml.gz"))


def _docs(path: Path) -> list:
    import gzip
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _merge_patch(base, patch):
    """RFC 7386 JSON merge patch (what kustomize applies for a CRD without a patch schema)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base) if isinstance(base, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _strict(schema):
    """The CRD's structural schema with unknown fields rejected, as `kubectl apply
    --validate=strict` does (the API server would silently prune them otherwise)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayservice_validator():
    if not CRD.exists():
        pytest.skip(f"KubeRay RayService CRD not found at {CRD} (set DFLASH_RAYSERVICE_CRD)")
    crd = _docs(CRD)[0]
    assert crd["spec"]["names"]["kind"] == "RayService"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def _errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def _rayservice() -> dict:
    return _docs(K8S / "base" / "rayservice.yaml")[0]


def _disaggregated() -> dict:
    patch = _docs(K8S / "disaggregated" / "serve-config.yaml")[0]
    return _merge_patch(_rayservice(), patch)


def _autoscaling() -> dict:
    patch = _docs(K8S / "autoscaling" / "serve-config.yaml")[0]
    return _merge_patch(_rayservice(), patch)


def _variant(name: str) -> dict:
    return {"colocated": _rayservice, "": _rayservice, "disaggregated": _disaggregated,
            "autoscaling": _autoscaling}[name]()


def _serve_config(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


# --------------------------------------------------------------------------- parsing

def test_every_manifest_parses_and_names_its_kind():
    files = sorted(K8S.rglob("*.yaml"))
    assert {p.relative_to(K8S).as_posix() for p in files} >= {
        "base/rayservice.yaml", "base/monitoring.yaml", "base/kustomization.yaml", "kustomization.yaml",
        "disaggregated/kustomization.yaml", "disaggregated/serve-config.yaml",
        "autoscaling/kustomization.yaml", "autoscaling/serve-config.yaml"}
    for path in files:
        docs = _docs(path)
        assert docs, path
        for doc in docs:
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), path
    dashboard = json.loads((K8S / "base" / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]


def test_kustomizations_reference_existing_files():
    kfiles = sorted(K8S.rglob("kustomization.yaml"))
    assert len(kfiles) == 4   # k8s/, base/, disaggregated/, autoscaling/
    for kfile in kfiles:
        k = _docs(kfile)[0]
        assert k["kind"] == "Kustomization"
        for res in k.get("resources", []):
            assert (kfile.parent / res).exists(), (kfile, res)
        for patch in k.get("patches", []):
            assert (kfile.parent / patch["path"]).exists(), (kfile, patch)
        for gen in k.get("configMapGenerator", []):
            for f in gen["files"]:
                assert (kfile.parent / f).exists(), (kfile, f)


def test_no_kustomization_includes_a_folder_that_contains_it():
    """kustomize refuses `resources: [../]` (a root containing a visited root): overlays
    reference base/, never an ancestor folder."""
    for kfile in K8S.rglob("kustomization.yaml"):
        here = kfile.parent.resolve()
        for res in _docs(kfile)[0].get("resources", []):
            target = (kfile.parent / res).resolve()
            assert target.is_file() or target not in here.parents and target != here, (kfile, res)


def _kustomize_cmd() -> list[str] | None:
    import shutil
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("overlay", ["", "disaggregated", "autoscaling"])
def test_real_kustomize_builds_every_kustomization(overlay):
    """What `kubectl apply -k` would send: built by a real kustomize, the RayService equals
    the manifests (and, for the overlay, the merge patch) these tests check."""
    import subprocess
    cmd = _kustomize_cmd()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl is on PATH (kubectl ships kustomize: `kubectl kustomize`)")
    r = subprocess.run([*cmd, str(K8S / overlay)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("RayService") == 1 and "ConfigMap" in kinds, kinds
    rs = next(d for d in docs if d["kind"] == "RayService")
    want = _variant(overlay)
    assert _serve_config(rs) == _serve_config(want)
    assert rs["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dflash-serve"
    images = {c["image"] for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
              for c in g["template"]["spec"]["containers"]}
    assert images == {"dflash-serve:latest"}


# --------------------------------------------------------------------------- CRD schema

@pytest.mark.parametrize("variant", ["colocated", "disaggregated", "autoscaling"])
def test_rayservice_validates_against_the_kuberay_crd(rayservice_validator, variant):
    rs = _variant(variant)
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    assert _errors(rayservice_validator, rs) == []


@pytest.mark.parametrize("variant", ["colocated", "disaggregated", "autoscaling"])
def test_ray_control_plane_requires_a_token(variant):
    """Ray's GCS/raylet/dashboard listen on the pod IPs: KubeRay's token auth is on."""
    rs = _variant(variant)
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}


def test_the_strict_schema_catches_mistakes(rayservice_validator):
    """The validation above can fail: typos, wrong types and missing required fields."""
    rs = _rayservice()
    bad = copy.deepcopy(rs)
    bad["spec"]["serveConfigv2"] = bad["spec"].pop("serveConfigV2")  # typo in a field name
    assert any("serveConfigv2" in e for e in _errors(rayservice_validator, bad))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "1"  # string, not int
    assert any("replicas" in e for e in _errors(rayservice_validator, bad))
    bad = copy.deepcopy(rs)
    del bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in _errors(rayservice_validator, bad))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    assert any("num-cpus" in e for e in _errors(rayservice_validator, bad))


# --------------------------------------------------------------------------- Serve config

def _deployment_names(app) -> set[str]:
    """Deployment names of a bound Serve application (the ingress and its bound children)."""
    from ray.serve.deployment import Application

    names, todo = set(), [app]
    while todo:
        bound = todo.pop()._bound_deployment
        names.add(bound.name)
        todo += [a for a in list(bound.init_args) + list(bound.init_kwargs.values()) if isinstance(a, Application)]
    return names


@pytest.mark.parametrize("variant", ["colocated", "disaggregated"])
def test_serve_config_builds_this_repos_application(variant):
    from service.config import ServiceConfig

    from ray.serve.schema import ServeDeploySchema

    rs = _rayservice() if variant == "colocated" else _disaggregated()
    cfg = _serve_config(rs)
    ServeDeploySchema.model_validate(cfg)  # what KubeRay's PUT /api/serve/applications/ checks
    assert cfg["http_options"]["port"] == 8000
    (app,) = cfg["applications"]
    module_name, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attr)
    # the args are ServiceConfig fields (unknown keys raise) and describe this variant
    service_cfg = ServiceConfig.from_dict(app["args"])
    assert service_cfg.placement == variant and service_cfg.device == "cuda"
    # the builder binds exactly the deployments the config lists (nothing is constructed)
    listed = {d["name"] for d in app["deployments"]}
    assert _deployment_names(builder(app["args"])) == listed
    # the resources the config pins per deployment are the ones the args ask for
    for d in app["deployments"]:
        assert d["ray_actor_options"]["num_gpus"] == service_cfg.num_gpus
        assert d["ray_actor_options"]["num_cpus"] == service_cfg.num_cpus
        # torch threads per replica = the CPUs it reserves (0 would take every CPU of the node)
        assert service_cfg.threads == d["ray_actor_options"]["num_cpus"]
    gpus_per_pod = float(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
                         ["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert sum(d["ray_actor_options"]["num_gpus"] * d.get("num_replicas", 1) for d in app["deployments"]) \
        <= gpus_per_pod
    if variant == "disaggregated":
        assert [d["ray_actor_options"]["num_gpus"] for d in app["deployments"]] == [0.5, 0.5]


def test_serve_config_matches_deploy_serve_yaml():
    """Same application as the local Serve config: import path, route, the deployments its
    args bind, and every option that does not depend on the device."""
    local = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    ours = _serve_config(_rayservice())
    by_name = {a["name"]: a for a in local["applications"]}
    for app in ours["applications"]:
        ref = by_name[app["name"]]
        assert app["import_path"] == ref["import_path"]
        assert app.get("route_prefix", "/") == ref.get("route_prefix", "/")
        module_name, _, attr = ref["import_path"].partition(":")
        builder = getattr(importlib.import_module(module_name), attr)
        assert _deployment_names(builder(ref.get("args", {}))) == {d["name"] for d in app["deployments"]}
        # GPU sizing is the RayService's own; everything else must agree
        sizing = {"device", "dtype", "num_gpus", "num_cpus", "threads", "max_slots", "max_seq_len", "max_queue",
                  "block_size_schedule", "log_level"}
        shared = (set(app["args"]) | set(ref.get("args", {}))) - sizing
        assert {k: app["args"].get(k) for k in shared} == {k: ref["args"].get(k) for k in shared}


# --------------------------------------------------------------------------- pods, Service, monitoring

def _worker_container(rs: dict) -> dict:
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group["template"]["spec"]["containers"][0]


def test_every_container_has_http_probes():
    """KubeRay injects `wget` exec probes where none are given; the image (deploy/Dockerfile,
    python:3.11-slim) has no wget, so every Ray container spells out HTTP probes."""
    rs = _rayservice()
    groups = [rs["spec"]["rayClusterConfig"]["headGroupSpec"]] + rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for group in groups:
        for c in group["template"]["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                assert "httpGet" in c[probe], (c["name"], probe)


def test_gpu_worker_resources_readiness_and_service_port():
    rs = _rayservice()
    c = _worker_container(rs)
    res = c["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
    for key in ("cpu", "memory"):
        assert res["requests"][key] and res["limits"][key]
    probe = c["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/health", 8000)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["serve"] == 8000
    svc_ports = rs["spec"]["serveService"]["spec"]["ports"]
    assert any(p["port"] == 8000 and p["targetPort"] == 8000 for p in svc_ports)
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    # the image is set in one place (kustomization.yaml `images:`)
    images = {d["name"] for d in _docs(K8S / "base" / "kustomization.yaml")[0]["images"]}
    assert c["image"].split(":")[0] in images
    assert head["template"]["spec"]["containers"][0]["image"] == c["image"]


def test_pod_monitors_select_ray_pods_on_named_ports():
    rs = _rayservice()
    pod_labels = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    worker_ports = {p["name"] for p in _worker_container(rs)["ports"]}
    head_ports = {p["name"] for p in rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
                  ["containers"][0]["ports"]}
    monitors = [d for d in _docs(K8S / "base" / "monitoring.yaml") if d["kind"] == "PodMonitor"]
    assert monitors
    app_monitor = next(m for m in monitors if any(e.get("path") == "/metrics" and e["port"] == "serve"
                                                 for e in m["spec"]["podMetricsEndpoints"]))
    # app metrics only from worker pods (the head's proxy would duplicate a worker's series)
    assert app_monitor["spec"]["selector"]["matchLabels"]["ray.io/node-type"] == "worker"
    for m in monitors:
        sel = {k: v for k, v in m["spec"]["selector"]["matchLabels"].items() if not k.startswith("ray.io/")}
        assert sel.items() <= pod_labels.items()
        for ep in m["spec"]["podMetricsEndpoints"]:
            assert ep["port"] in worker_ports
            if "ray.io/node-type" not in m["spec"]["selector"]["matchLabels"]:
                assert ep["port"] in head_ports


def _service_metric_names() -> set[str]:
    """Every sample name the service exports (service/metrics.py), histograms included."""
    from loadtest.report import parse_metrics
    from service.metrics import ServiceMetrics

    m = ServiceMetrics("m", max_slots=2)
    m.on_spec(1, 4, 2, [1, 1])
    m.on_http(200)
    m.on_finished("stop", 1.0, 3)
    names = {name for name, _ in parse_metrics(m.render().decode())}
    return names


def test_dashboard_queries_use_metrics_the_service_exports():
    exported = _service_metric_names()
    dashboard = json.loads((K8S / "base" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\b(dflash_[a-z_]+)\b", e)}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for want in ("acceptance length", "tokens/s", "time to first token", "inter-token", "running / waiting"):
        assert want in titles
    # the acceptance length is 1 + accepted / drafts (tokens per target forward)
    assert any("1 + " in e and "num_accepted_tokens_total" in e and "num_drafts_total" in e for e in exprs)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_autoscaling_overlay_scales_replicas_and_pods_together():
    """Serve autoscaling in the serve config (the app's args and the deployment entry say
    the same), KubeRay's in-tree autoscaler on, max_replicas = the worker group's
    maxReplicas (one GPU per replica, one GPU per pod), busy at max_slots ongoing requests."""
    from service.config import ServiceConfig
    from service.deployments import build_app
    rs = _autoscaling()
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    (app,) = _serve_config(rs)["applications"]
    (dep,) = app["deployments"]
    assert "num_replicas" not in dep
    auto = dep["autoscaling_config"]
    cfg = ServiceConfig.from_dict(app["args"])
    assert cfg.autoscaling == auto and auto["target_ongoing_requests"] == cfg.max_slots
    group = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    gpus = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert auto["max_replicas"] * dep["ray_actor_options"]["num_gpus"] / gpus == group["maxReplicas"]
    assert auto["min_replicas"] <= group["minReplicas"] + 1
    built = build_app(app["args"])._bound_deployment._deployment_config.autoscaling_config
    assert (built.min_replicas, built.max_replicas, built.target_ongoing_requests) == \
        (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"])
