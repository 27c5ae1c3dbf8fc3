"""deploy/kubernetes as a cluster would receive it: each overlay rendered by `kubectl kustomize`, then checked as
strictly as tools allow without a cluster. Every object against the Kubernetes schemas (kubernetes-validate, strict);
the whole against checkov's security policies; the containers' command lines through gptserve's own argument
parser, and what the probes, Services, Envoy and the autoscaler expect against what that command makes the server
serve; Envoy's configuration against Envoy's own protos (xds-protos; no Envoy build installs here). Last, the CPU
overlay's server command line runs for real, on a read-only root, and answers what its probes and its autoscaler
ask."""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import math
import pkgutil
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import grpc
import pytest
import yaml

from gptserve.cli import build_parser
from gptserve.service.client import GenerationClient
from gptserve.service.metrics import Metrics
from gptserve.service.server import SERVICE_NAME
from tests.deploy.support import DOCKERFILE, REPO, parse_dockerfile
from tests.deploy.test_load_balancer import free_port

KUBERNETES = REPO / "deploy" / "kubernetes"
ENVOY_CONFIG = KUBERNETES / "base" / "envoy.yaml"
ADAPTER_VALUES = KUBERNETES / "prometheus-adapter.yaml"
OVERLAYS = ("gpu", "cpu")
PROVIDERS = {"gpu": ("cuda", "fp16"), "cpu": ("cpu", "fp32")}  # overlay: (--provider, export --precision)
KUBERNETES_VERSION = "1.37.0"  # the newest schemas kubernetes-validate 1.37 has
# Kinds validated against a CRD's schema, or skipped by name: none, every object here is a built-in kind (the
# autoscaler reads custom metrics through an HPA; Prometheus finds the pods by annotation, not a ServiceMonitor).
CUSTOM_KINDS: dict[str, str] = {}
KINDS = {"Namespace", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler",
         "NetworkPolicy"}
CHECKOV = REPO / "build" / "checkov" / "bin" / "checkov"  # its own venv, made by `make test-deps`
HEALTH_SERVICES = {"", SERVICE_NAME}  # the names the server's grpc.health.v1 service answers for
START_TIMEOUT = 120.0


def tool(name: str) -> str:
    """A command-line tool of the test extra: beside this Python (the venv's bin), else on PATH."""
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (the test extra of pyproject.toml brings it)")
    return found


@cache
def render(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(KUBERNETES / overlay)], capture_output=True, text=True)
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return tuple(document for document in yaml.safe_load_all(result.stdout) if document)


def find(objects, kind: str, name: str) -> dict:
    (found,) = [item for item in objects if item["kind"] == kind and item["metadata"]["name"] == name]
    return found


def container(pod: dict, name: str) -> dict:
    (found,) = [item for item in pod["containers"] + pod.get("initContainers", []) if item["name"] == name]
    return found


def cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def environment(objects, pod: dict, spec: dict) -> dict[str, str]:
    """A container's environment as the kubelet builds it, for what these manifests use: envFrom ConfigMaps, plain
    values, and CPU from resourceFieldRef (whole cores, rounded up, as the default divisor of 1 gives)."""
    values: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        wanted = source["configMapRef"]["name"]
        values.update(next(item["data"] for item in objects
                           if item["kind"] == "ConfigMap" and item["metadata"]["name"] == wanted))
    for variable in spec.get("env", []):
        if "value" in variable:
            values[variable["name"]] = variable["value"]
        else:
            field = variable["valueFrom"]["resourceFieldRef"]
            kind, resource = field["resource"].split(".")
            quantity = container(pod, field["containerName"])["resources"][kind][resource]
            values[variable["name"]] = str(math.ceil(cores(quantity)))
    return values


def command_line(objects, pod: dict, name: str) -> list[str]:
    """The container's command and arguments with $(VAR) expanded from its environment, as the kubelet does."""
    spec = container(pod, name)
    values = environment(objects, pod, spec)
    words = spec["command"] + spec["args"]
    expand = lambda match: values.get(match[1], match[0])  # the kubelet leaves an unknown $(NAME) as it is
    expanded = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, word) for word in words]
    assert not [word for word in expanded if "$(" in word], f"unknown variables in {expanded}"
    return expanded


def parse_gptserve(words: list[str]):
    assert words[0] == "gptserve", words
    try:
        return build_parser().parse_args(words[1:])
    except SystemExit as error:
        pytest.fail(f"gptserve rejects {words}: exit {error.code}")


def server_pod(objects) -> dict:
    return find(objects, "Deployment", "gptserve")["spec"]["template"]["spec"]


def serve_arguments(objects):
    return parse_gptserve(command_line(objects, server_pod(objects), "server"))


def mount(spec: dict, path: str) -> dict:
    """The volume mount that holds `path` (the deepest one)."""
    holding = [item for item in spec["volumeMounts"] if Path(path).is_relative_to(item["mountPath"])]
    assert holding, f"{spec['name']} mounts nothing at {path}"
    return max(holding, key=lambda item: len(item["mountPath"]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_and_every_object_validates_strictly(overlay):
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, validate

    objects = render(overlay)
    assert {item["kind"] for item in objects} == KINDS
    errors = []
    for item in objects:
        try:
            validate(item, KUBERNETES_VERSION, strict=True)
        except SchemaNotFoundError:
            assert item["kind"] in CUSTOM_KINDS, f"no schema for {item['kind']}: validate it or name it as skipped"
        except ValidationError as error:
            errors.append(f"{item['kind']}/{item['metadata']['name']}: {'.'.join(map(str, error.path))}: "
                          f"{error.message}")
    assert errors == []


def test_strict_validation_catches_mistakes():
    """The check has teeth: a misspelt field, and a gRPC probe on a named port (it takes a number only)."""
    from kubernetes_validate.utils import ValidationError, validate

    deployment = copy.deepcopy(find(render("cpu"), "Deployment", "gptserve"))
    pod = deployment["spec"]["template"]["spec"]
    pod["terminationGracePeriod"] = pod.pop("terminationGracePeriodSeconds")
    with pytest.raises(ValidationError, match="terminationGracePeriod"):
        validate(deployment, KUBERNETES_VERSION, strict=True)
    pod["terminationGracePeriodSeconds"] = pod.pop("terminationGracePeriod")
    validate(deployment, KUBERNETES_VERSION, strict=True)
    container(pod, "server")["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(ValidationError):
        validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_nothing_unjustified(overlay, tmp_path):
    if not CHECKOV.exists():
        pytest.skip(f"checkov is not installed in {CHECKOV.parents[1]} (`make test-deps` installs it)")
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(yaml.safe_dump_all(render(overlay)))
    # --skip-download: nothing from Prisma Cloud (no network); the policies are the ones checkov ships.
    result = subprocess.run([str(CHECKOV), "--file", str(manifest), "--framework", "kubernetes", "--skip-download",
                             "--output", "json"], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    failed = [f"{check['check_id']} {check['resource']}: {check['check_name']}"
              for check in report["results"]["failed_checks"]]
    assert failed == []
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] >= 100, report["summary"]  # it did look at the pods
    # Each skip is in place, on the object it concerns, with its reason.
    for check in report["results"]["skipped_checks"]:
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason) > 40, f"{check['check_id']} on {check['resource']} skipped without a reason"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_commands_are_what_gptserve_accepts(overlay):
    objects = render(overlay)
    pod = server_pod(objects)
    export = parse_gptserve(command_line(objects, pod, "export"))
    serve = serve_arguments(objects)
    provider, precision = PROVIDERS[overlay]
    assert export.command == "export" and serve.command == "serve"
    assert (serve.provider, export.precision) == (provider, precision)
    # The server serves exactly the folder the init container certified, read-only, and never exports itself.
    assert serve.artifacts == export.out and serve.model is None
    export_mount, serve_mount = mount(container(pod, "export"), export.out), mount(container(pod, "server"),
                                                                                  serve.artifacts)
    assert export_mount["name"] == serve_mount["name"] and export_mount["mountPath"] == serve_mount["mountPath"]
    assert serve_mount.get("readOnly") and not export_mount.get("readOnly")
    assert serve.host == "0.0.0.0" and serve.metrics_host == "0.0.0.0"  # reachable by Envoy and Prometheus
    requested = container(pod, "server")["resources"]["requests"]["cpu"]
    assert serve.threads == math.ceil(cores(requested))
    # The token file is the gptserve-auth Secret's key `token`.
    token = mount(container(pod, "server"), serve.auth_token_file)
    (volume,) = [item for item in pod["volumes"] if item["name"] == token["name"]]
    assert volume["secret"]["secretName"] == "gptserve-auth"
    relative = Path(serve.auth_token_file).relative_to(token["mountPath"])
    assert {"key": "token", "path": str(relative)} in volume["secret"]["items"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_drains_before_the_kubelet_kills(overlay):
    objects = render(overlay)
    pod = server_pod(objects)
    serve = serve_arguments(objects)
    liveness = container(pod, "server")["livenessProbe"]
    # --grace-seconds < terminationGracePeriodSeconds < the time liveness takes to fail a draining (NOT_SERVING) pod.
    assert serve.grace_seconds < pod["terminationGracePeriodSeconds"]
    assert pod["terminationGracePeriodSeconds"] < liveness["periodSeconds"] * liveness["failureThreshold"]
    strategy = find(objects, "Deployment", "gptserve")["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 1, "maxUnavailable": 0}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_the_balancer_match_the_server(overlay):
    objects = render(overlay)
    pod = server_pod(objects)
    server = container(pod, "server")
    serve = serve_arguments(objects)
    ports = {item["name"]: item["containerPort"] for item in server["ports"]}
    assert ports == {"grpc": serve.port, "http": serve.http_port, "metrics": serve.metrics_port}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[kind]["grpc"]["port"] == serve.port, kind
        assert server[kind]["grpc"].get("service", "") in HEALTH_SERVICES, kind
    annotations = find(objects, "Deployment", "gptserve")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(serve.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    replicas = find(objects, "Service", "gptserve-replicas")["spec"]
    assert replicas["clusterIP"] == "None"
    assert {item["name"]: (item["port"], item["targetPort"]) for item in replicas["ports"]} == {
        name: (port, name) for name, port in ports.items()}
    # Envoy dials the headless Service's addresses on the server's own ports, and checks their health as the
    # kubelet does.
    clusters = {cluster["name"]: cluster for cluster in envoy_config()["static_resources"]["clusters"]}
    for cluster, port in (("gptserve-grpc", serve.port), ("gptserve-http", serve.http_port)):
        (endpoint,) = clusters[cluster]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "gptserve-replicas",
                                                                     "port_value": port}
    (grpc_check,) = clusters["gptserve-grpc"]["health_checks"]
    assert grpc_check["grpc_health_check"].get("service_name", "") in HEALTH_SERVICES
    (http_check,) = clusters["gptserve-http"]["health_checks"]
    assert http_check["http_health_check"]["path"] == "/health"
    # The network policies open the ports by the names the server container gives them.
    policies = {item["metadata"]["name"]: item["spec"] for item in objects if item["kind"] == "NetworkPolicy"}
    opened = [port["port"] for rule in policies["gptserve-server"]["ingress"] for port in rule["ports"]]
    server_labels = find(objects, "Deployment", "gptserve")["spec"]["template"]["metadata"]["labels"]
    opened += [port["port"] for rule in policies["gptserve-envoy"]["egress"]
               if rule["to"][0].get("podSelector", {}).get("matchLabels") == server_labels for port in rule["ports"]]
    assert set(opened) == set(ports)


def envoy_config() -> dict:
    return yaml.safe_load(ENVOY_CONFIG.read_text())


def envoy_bootstrap(document: dict):
    """The configuration parsed into Envoy's Bootstrap message: every field name, type, enum value and typed
    config (`@type`) checked against Envoy's own API, as Envoy's loader reads it."""
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from google.protobuf import json_format

    def type_names(node):
        if isinstance(node, dict):
            if "@type" in node:
                yield node["@type"].rsplit("/", 1)[1]
            for value in node.values():
                yield from type_names(value)
        elif isinstance(node, list):
            for value in node:
                yield from type_names(value)

    for name in set(type_names(document)):  # registers each typed config's message: its package's modules
        package = importlib.import_module(name.rsplit(".", 1)[0])
        for module in pkgutil.iter_modules(package.__path__):
            if module.name.endswith("_pb2"):
                importlib.import_module(f"{package.__name__}.{module.name}")
    return json_format.ParseDict(document, bootstrap_pb2.Bootstrap())


def test_envoy_configuration_against_envoys_api():
    pytest.importorskip("envoy.config.bootstrap.v3.bootstrap_pb2", reason="xds-protos (the test extra)")
    bootstrap = envoy_bootstrap(envoy_config())
    (listener,) = bootstrap.static_resources.listeners
    assert {cluster.name for cluster in bootstrap.static_resources.clusters} == {"gptserve-grpc", "gptserve-http"}
    (manager,) = listener.filter_chains[0].filters
    assert manager.typed_config.type_url.endswith("HttpConnectionManager")


def test_the_envoy_check_catches_mistakes():
    pytest.importorskip("envoy.config.bootstrap.v3.bootstrap_pb2", reason="xds-protos (the test extra)")
    from google.protobuf.json_format import ParseError

    manager = ["static_resources", "listeners", 0, "filter_chains", 0, "filters", 0, "typed_config"]
    for path, key, value in ((["static_resources", "clusters", 0], "lb_polcy", "LEAST_REQUEST"),
                             (["static_resources", "clusters", 0], "type", "STRICT_DSN"),
                             (["static_resources", "clusters", 0, "health_checks", 0], "interval", "five"),
                             (manager, "stat_prefx", "gptserve"),  # inside a typed config
                             (manager, "codec_type", "HTTP4")):
        document = envoy_config()
        node = document
        for step in path:
            node = node[step]
        node[key] = value
        with pytest.raises(ParseError):
            envoy_bootstrap(document)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_reads_what_its_pod_mounts(overlay):
    objects = render(overlay)
    pod = find(objects, "Deployment", "gptserve-envoy")["spec"]["template"]["spec"]
    (envoy,) = pod["containers"]
    arguments = envoy["args"]
    config_path = arguments[arguments.index("--config-path") + 1]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    config_volume = volumes[mount(envoy, config_path)["name"]]["configMap"]["name"]
    data = find(objects, "ConfigMap", config_volume)["data"]
    assert yaml.safe_load(data[Path(config_path).name]) == envoy_config()
    (listener,) = envoy_config()["static_resources"]["listeners"]
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    (certificate,) = tls["tls_certificates"]
    for path, key in ((certificate["certificate_chain"]["filename"], "tls.crt"),
                      (certificate["private_key"]["filename"], "tls.key")):
        assert volumes[mount(envoy, path)["name"]]["secret"]["secretName"] == "gptserve-tls"
        assert Path(path).name == key  # the keys of a Secret of type kubernetes.io/tls
    (port,) = envoy["ports"]
    assert listener["address"]["socket_address"]["port_value"] == port["containerPort"]
    (service_port,) = find(objects, "Service", "gptserve")["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_gpu_per_replica_on_gpus_only(overlay):
    objects = render(overlay)
    server = container(server_pod(objects), "server")
    limits = server["resources"]["limits"]
    assert server["image"] == f"gptserve:{overlay}"
    if overlay == "gpu":
        assert int(limits["nvidia.com/gpu"]) == 1
    else:
        assert "nvidia.com/gpu" not in limits
    for item in objects:  # every container asks for what it uses, within its limits
        if item["kind"] == "Deployment":
            pod = item["spec"]["template"]["spec"]
            for spec in pod["containers"] + pod.get("initContainers", []):
                requests, limits = spec["resources"]["requests"], spec["resources"]["limits"]
                assert cores(requests["cpu"]) <= cores(limits["cpu"]), spec["name"]
                assert set(requests) >= {"cpu", "memory"} and set(limits) >= {"cpu", "memory"}, spec["name"]


def adapter_rule(metric: str) -> dict:
    """The Prometheus adapter's rule whose series query selects `metric`."""
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    (found,) = [rule for rule in rules
                if re.fullmatch(re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"])[1], metric)]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_on_gauges_the_server_exports(overlay):
    objects = render(overlay)
    autoscaler = find(objects, "HorizontalPodAutoscaler", "gptserve")["spec"]
    target = autoscaler["scaleTargetRef"]
    assert find(objects, target["kind"], target["name"])["apiVersion"] == target["apiVersion"]
    gauges = {metric.name for metric in Metrics().registry.collect() if metric.type == "gauge"}
    served = {}
    for metric in autoscaler["metrics"]:
        name = metric["pods"]["metric"]["name"]
        assert name in gauges, f"the server exports no gauge {name}"
        # The adapter's rule finds the series and serves it under this name ($1 is Python's \1).
        rule = adapter_rule(name)
        assert re.sub(rule["name"]["matches"], rule["name"]["as"].replace("$", "\\"), name) == name
        served[name] = float(metric["pods"]["target"]["averageValue"])
    serve = serve_arguments(objects)
    assert 0 < served["gptserve_active_sequences"] < serve.max_batch_size  # scale before batches are full
    assert "gptserve_queue_depth" in served
    budget = find(objects, "PodDisruptionBudget", "gptserve")["spec"]
    assert budget["maxUnavailable"] < autoscaler["minReplicas"]  # a drain never takes the last replica


def selectors(item: dict) -> list[dict]:
    """The pod labels an object selects by: its selector, a policy's pods, a spread constraint's pods."""
    spec = item.get("spec", {})
    if item["kind"] == "Service":
        return [spec["selector"]]
    if item["kind"] == "PodDisruptionBudget":
        return [spec["selector"]["matchLabels"]]
    if item["kind"] == "NetworkPolicy":
        return [spec["podSelector"]["matchLabels"]]
    if item["kind"] == "Deployment":
        spread = spec["template"]["spec"].get("topologySpreadConstraints", [])
        return [spec["selector"]["matchLabels"], *(constraint["labelSelector"]["matchLabels"] for constraint in spread)]
    return []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_selector_selects_one_deployments_pods(overlay):
    objects = render(overlay)
    pods = [item["spec"]["template"]["metadata"]["labels"] for item in objects if item["kind"] == "Deployment"]
    for item in objects:
        for labels in selectors(item):
            chosen = [pod for pod in pods if labels and labels.items() <= pod.items()]
            assert len(chosen) == 1, f"{item['kind']}/{item['metadata']['name']} selects {labels}"


def test_pods_run_as_the_images_user():
    dockerfile = parse_dockerfile(DOCKERFILE)
    for overlay in OVERLAYS:
        pod = server_pod(render(overlay))
        for stage in (overlay, "export"):
            user = next(arguments for image in dockerfile.lineage(stage) for arguments in reversed(image.all("USER")))
            assert user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
        assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"]


def test_secrets_are_created_as_the_readme_says():
    readme = (REPO / "README.md").read_text()
    assert "## Scaling past one host" in readme
    section = readme.split("## Scaling past one host", 1)[1].split("\n## ", 1)[0]
    for overlay in OVERLAYS:
        for item in render(overlay):
            if item["kind"] == "Deployment":
                for volume in item["spec"]["template"]["spec"]["volumes"]:
                    if "secret" in volume:
                        name = volume["secret"]["secretName"]
                        assert re.search(rf"kubectl .*create secret \w+ {name}\b", section), name


# The command after it runs with the root filesystem read-only, as readOnlyRootFilesystem has it: a private mount
# namespace, so nothing outside the command sees the remount (it needs root, as CI has).
READ_ONLY_ROOT = ["unshare", "--mount", "--propagation", "private",
                  "sh", "-c", 'mount -o remount,bind,ro / && exec "$@"', "sh"]


def read_only_root() -> list[str]:
    """READ_ONLY_ROOT where this machine allows it, else nothing."""
    if shutil.which("unshare") is None:
        return []
    return READ_ONLY_ROOT if subprocess.run([*READ_ONLY_ROOT, "true"], capture_output=True).returncode == 0 else []


@dataclass
class RunningServer:
    ports: dict[str, int]
    read_only_root: bool


@pytest.fixture(scope="module")
def cpu_server(tiny_artifact, tmp_path_factory):
    """The CPU overlay's server command line, run: only what ties it to a pod is swapped (the artifact, the token
    file, addresses and ports, threads), every other flag as the manifest gives it, on a read-only root where
    possible. Yields once it is SERVING for the name the readiness probe asks about, without a token, as the
    kubelet asks."""
    folder = tmp_path_factory.mktemp("kubernetes-server")
    objects = render("cpu")
    words = command_line(objects, server_pod(objects), "server")
    token = folder / "token"
    token.write_text("kubernetes-test-token\n")
    ports = {flag: free_port() for flag in ("--port", "--http-port", "--metrics-port")}
    swapped = {"--artifacts": str(tiny_artifact), "--auth-token-file": str(token), "--host": "127.0.0.1",
               "--metrics-host": "127.0.0.1", "--threads": "1", **{flag: str(port) for flag, port in ports.items()}}
    for flag, value in swapped.items():
        words[words.index(flag) + 1] = value
    log = folder / "server.log"
    prefix = read_only_root()
    with open(log, "wb") as output:
        process = subprocess.Popen([*prefix, sys.executable, "-m", "gptserve", *words[1:]], stdout=output,
                                   stderr=subprocess.STDOUT, cwd=REPO)
    try:
        probe = container(server_pod(objects), "server")["readinessProbe"]["grpc"]
        deadline = time.monotonic() + START_TIMEOUT
        with GenerationClient(f"127.0.0.1:{ports['--port']}", timeout=2) as client:
            while True:
                if process.poll() is not None:
                    pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
                with contextlib.suppress(grpc.RpcError):
                    if client.health(probe.get("service", "")) == "SERVING":
                        break
                assert time.monotonic() < deadline, f"not SERVING within {START_TIMEOUT} s:\n{log.read_text()}"
                time.sleep(0.1)
        yield RunningServer(ports, bool(prefix))
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_cpu_overlays_server_serves_from_a_read_only_root(cpu_server):
    if not cpu_server.read_only_root:
        pytest.skip("no private mount namespace here (unshare needs root): the server ran on a writable root")


def test_the_cpu_overlays_server_exports_what_its_autoscaler_reads(cpu_server):
    url = f"http://127.0.0.1:{cpu_server.ports['--metrics-port']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        exported = {line.split()[0].split("{")[0] for line in response.read().decode().splitlines()
                    if not line.startswith("#")}
    for metric in find(render("cpu"), "HorizontalPodAutoscaler", "gptserve")["spec"]["metrics"]:
        assert metric["pods"]["metric"]["name"] in exported


def test_the_cpu_overlays_server_answers_envoys_http_health_check(cpu_server):
    if importlib.util.find_spec("gptserve.service.http_api") is None:
        pytest.skip("this tree has no OpenAI-compatible HTTP API yet (gptserve.service.http_api)")
    (check,) = [check for cluster in envoy_config()["static_resources"]["clusters"]
                for check in cluster["health_checks"] if "http_health_check" in check]
    url = f"http://127.0.0.1:{cpu_server.ports['--http-port']}{check['http_health_check']['path']}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    assert status == 200, f"GET {url} answered {status} on a SERVING server"
