"""docker-compose.yml (and the TLS overlay) against the compose specification's JSON schema, and against what the
server actually reads: its command-line flags, its environment variables, its ports."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from gptserve.cli import build_parser
from tests.deploy.support import (
    COMPOSE_FILE,
    DOCKERFILE,
    NGINX_TEMPLATE,
    REPO,
    TLS_OVERLAY,
    compose_variables,
    load_compose,
    parse_dockerfile,
    template_placeholders,
)

SCHEMA = Path(__file__).resolve().parents[1] / "data" / "compose-spec.json"
SERVERS = ("gptserve", "gptserve-cpu")  # the GPU and the CPU profile's server
SOURCE_FOLDERS = ("model", "export", "service", "gptserve")
UNSET: dict[str, str] = {}  # no variable set: compose's defaults apply
# The overlay's one required variable.
TLS_ENVIRONMENT = {"GPTSERVE_TLS_DIR": "/etc/gptserve/tls"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE_FILE, UNSET)


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (the test extra) validates the compose files")
    schema = json.loads(SCHEMA.read_text())
    # The schema names draft 07 by an address jsonschema does not list (no trailing '#'): say it outright.
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator, document: dict) -> list[str]:
    return [f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
            for error in validator.iter_errors(document)]


@pytest.mark.parametrize("path, environ", [(COMPOSE_FILE, None), (COMPOSE_FILE, UNSET),
                                           (TLS_OVERLAY, None), (TLS_OVERLAY, TLS_ENVIRONMENT)],
                         ids=["compose-raw", "compose-interpolated", "tls-raw", "tls-interpolated"])
def test_valid_against_the_compose_schema(validator, path, environ):
    assert schema_errors(validator, load_compose(path, environ)) == []


def test_the_schema_check_catches_mistakes(validator, compose):
    """The check has teeth: a misspelt key and a wrong device list both fail it."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["nginx"]["prots"] = broken["services"]["nginx"].pop("ports")
    broken["services"]["gptserve"]["deploy"]["resources"]["reservations"]["devices"] = [{"driver": "nvidia"}]
    errors = schema_errors(validator, broken)
    assert any("prots" in error for error in errors), errors
    assert any("capabilities" in error for error in errors), errors


def test_vendored_schema_keeps_its_license():
    assert (SCHEMA.parent / "compose-spec.LICENSE").read_text().lstrip().startswith("Apache License")


def test_profiles_gpu_reservation_and_replicas(compose):
    services = compose["services"]
    assert services["gptserve"]["profiles"] == ["gpu"] and services["gptserve-cpu"]["profiles"] == ["cpu"]
    assert services["export"]["profiles"] == ["gpu"] and services["export-cpu"]["profiles"] == ["cpu"]
    assert "profiles" not in services["nginx"]  # runs with either
    # Each profile exports (and serves) its default precision: fp16 on GPUs, fp32 on CPUs.
    for export, server, precision in (("export", "gptserve", "fp16"), ("export-cpu", "gptserve-cpu", "fp32")):
        assert services[export]["environment"]["GPTSERVE_PRECISION"] == precision
        assert services[server]["environment"]["GPTSERVE_PRECISION"] == precision
        assert services[server]["depends_on"][export]["condition"] == "service_completed_successfully"
    devices = services["gptserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "resources" not in services["gptserve-cpu"].get("deploy", {})
    for name in SERVERS:
        assert int(services[name]["deploy"]["replicas"]) == 2
        assert "container_name" not in services[name] and "ports" not in services[name]  # replicas cannot share
        assert services["nginx"]["depends_on"][name] == {"condition": "service_healthy", "required": False}


def test_one_gpu_per_replica_through_a_service_per_gpu(compose):
    """The profile gpuN adds one replica on GPU N, in every other respect the gptserve service."""
    services = compose["services"]
    extra = {int(name.removeprefix("gptserve-gpu")): service for name, service in services.items()
             if re.fullmatch(r"gptserve-gpu\d+", name)}
    assert sorted(extra) == list(range(1, 8))  # with the gpu profile's GPU 0: hosts of up to 8 GPUs
    shared = lambda service: {key: value for key, value in service.items() if key not in ("profiles", "deploy")}
    for index, service in extra.items():
        assert service["profiles"] == [f"gpu{index}"]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [str(index)], "capabilities": ["gpu"]}]
        assert "replicas" not in service["deploy"]  # one
        assert shared(service) == shared(services["gptserve"])
    # Inside its container a replica sees its one GPU as device 0.
    assert build_parser().parse_args(serve_arguments(services["gptserve"])).device_id == 0


def test_build_targets_and_mounted_files_exist(compose):
    stages = {stage.name for stage in parse_dockerfile(DOCKERFILE).stages}
    overlay = load_compose(TLS_OVERLAY, TLS_ENVIRONMENT)
    for name, service in [*compose["services"].items(), *overlay["services"].items()]:
        if "build" in service:
            assert (REPO / service["build"]["context"]).resolve() == REPO
            assert service["build"]["target"] in stages, name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):  # a bind mount of a file of this repository (relative to the project)
                assert (REPO / source).is_file(), f"{name} mounts {source}, which does not exist"


def serve_arguments(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


@pytest.mark.parametrize("name", SERVERS)
def test_server_command_is_what_gptserve_serve_accepts(compose, name):
    """The command goes through the server's own argument parser: every flag exists, every value has its type."""
    arguments = serve_arguments(compose["services"][name])
    assert arguments[0] == "serve"
    try:
        parsed = build_parser().parse_args(arguments)
    except SystemExit as error:
        pytest.fail(f"gptserve rejects the compose command {arguments}: exit {error.code}")
    assert parsed.host == "0.0.0.0" and parsed.metrics_host == "0.0.0.0"  # reachable from nginx and scrapers
    assert parsed.metrics_port and parsed.port
    assert parsed.artifacts is None  # served from the cache folder the export service fills for --model
    assert parsed.model == compose["services"]["export"]["command"][0]
    assert parsed.grace_seconds < float(compose["services"][name]["stop_grace_period"].rstrip("s"))


@pytest.mark.parametrize("name", SERVERS)
def test_ports_agree(compose, name):
    parsed = build_parser().parse_args(serve_arguments(compose["services"][name]))
    service, nginx = compose["services"][name], compose["services"]["nginx"]
    assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{parsed.port}"
    aliases = service["networks"]["default"]["aliases"]
    upstream = re.fullmatch(r"server ([\w.-]+):(\d+) resolve;", nginx["environment"]["GPTSERVE_UPSTREAM_SERVERS"])
    assert upstream and upstream[1] in aliases and int(upstream[2]) == parsed.port
    http_upstream = re.fullmatch(r"server ([\w.-]+):(\d+) resolve;",
                                 nginx["environment"]["GPTSERVE_HTTP_UPSTREAM_SERVERS"])
    assert http_upstream and http_upstream[1] in aliases and int(http_upstream[2]) == parsed.http_port
    listen_ports = [nginx["environment"][name].split()[0] for name in ("GPTSERVE_LB_LISTEN", "GPTSERVE_HTTP_LB_LISTEN")]
    assert [published.split(":")[-1] for published in nginx["ports"]] == listen_ports


def test_healthcheck_and_export_scripts_are_in_the_images(compose):
    dockerfile = parse_dockerfile(DOCKERFILE)
    copied = {arguments.split()[-1]: arguments.split()[-2] for stage in dockerfile.stages
              for arguments in stage.all("COPY") if not arguments.startswith("--from")}
    for name in SERVERS:
        script = compose["services"][name]["healthcheck"]["test"][2]
        assert script in copied and (REPO / copied[script]).is_file()
    export_stage = dockerfile.stage(compose["services"]["export"]["build"]["target"])
    entrypoint = json.loads(export_stage.all("ENTRYPOINT")[-1])
    assert entrypoint[-1] in copied and (REPO / copied[entrypoint[-1]]).is_file()


def test_cache_volume_is_where_the_images_keep_artifacts(compose):
    for stage in parse_dockerfile(DOCKERFILE).stages:
        for arguments in stage.all("ENV"):
            if "GPTSERVE_CACHE=" in arguments:
                assert "GPTSERVE_CACHE=/cache" in arguments.split()
    assert "gptserve-cache:/cache" in compose["services"]["export"]["volumes"]
    for name in SERVERS:
        assert compose["services"][name]["volumes"] == ["gptserve-cache:/cache:ro"]
    assert "gptserve-cache" in compose["volumes"]


def project_source() -> str:
    return "\n".join(path.read_text() for folder in SOURCE_FOLDERS for path in (REPO / folder).rglob("*.py"))


def test_container_environment_is_read_by_gptserve(compose):
    """Every GPTSERVE_* variable handed to a container is one the project reads: none is silently ignored."""
    source = project_source()
    handed = {key for name in SERVERS for key in compose["services"][name].get("environment", {})}
    assert handed, "the servers get their token through the environment"
    for key in handed:
        assert key.startswith("GPTSERVE_") and f'"{key}"' in source, f"nothing in gptserve reads ${key}"


def test_every_setting_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    assert "## Deployment" in readme
    deployment = readme[readme.index("## Deployment"):]
    variables = {**compose_variables(COMPOSE_FILE.read_text()), **compose_variables(TLS_OVERLAY.read_text())}
    assert {"GPTSERVE_MODEL", "GPTSERVE_REPLICAS", "GPTSERVE_AUTH_TOKEN", "GPTSERVE_TLS_DIR"} <= set(variables)
    for name, default in variables.items():
        row = next((line for line in deployment.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"README's Deployment table has no row for {name}"
        if default:
            assert f"`{default}`" in row, f"README gives {name} another default than {default}: {row}"


def test_nginx_gets_every_template_placeholder(compose):
    template = NGINX_TEMPLATE.read_text()
    nginx = compose["services"]["nginx"]
    assert template_placeholders(template) == set(nginx["environment"])
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in nginx["volumes"]}
    assert mounted["/etc/nginx/templates/gptserve.conf.template"] == "./deploy/nginx/gptserve.conf.template"
    version = re.fullmatch(r"nginx:(\d+)\.(\d+)(?:\.\d+)?-alpine", nginx["image"])
    assert version and (int(version[1]), int(version[2])) >= (1, 28), "`resolve` needs nginx 1.27.3 or later"


def test_nginx_never_resends_a_call():
    """Retries only for calls not yet sent (refused or timed-out connections): a generation never runs twice."""
    code = [line.split("#")[0].strip() for line in NGINX_TEMPLATE.read_text().splitlines()]
    (retry,) = [line for line in code if line.startswith("grpc_next_upstream ")]
    assert retry == "grpc_next_upstream error timeout;"
    assert not any(line.startswith("keepalive") for line in code)  # see the template: dead replicas must refuse
