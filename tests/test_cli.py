"""The `gptserve` command as a user meets it, run as a real process: each mistake is one line on stderr and a
non-zero status, never a traceback (unless --debug asks for it); --version and --help; the serve settings' layers
(flags over GPTSERVE_<FLAG> over the --config file); an export that shows its own phases and nothing of its
libraries'; inspect's verdict and what it was judged on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from gptserve.cli import parse
from gptserve.settings import SettingError
from tests.deploy.support import COMPOSE_FILE, load_compose

# Lines of torch, onnxscript and ONNX Runtime's quantizer that an export must not show unless asked (-v).
LIBRARY_NOISE = ("torchvision", "LeafSpec", "axis name", "matmul_nbits_quantizer", "[INFO]", "Warning:", "[torch.onnx]")


def gptserve(*arguments: str, environment: dict[str, str] | None = None, timeout: float = 120):
    """Runs `gptserve ARGUMENTS` with no GPTSERVE_ variables but those given, and no HTTP API unless asked for (its
    default port, 8000, may be taken on the machine running the tests)."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("GPTSERVE_")}
    return subprocess.run([sys.executable, "-m", "gptserve", *arguments], capture_output=True, text=True,
                          timeout=timeout, env={**clean, "GPTSERVE_HTTP_PORT": "0", **(environment or {})})


def assert_one_line(done: subprocess.CompletedProcess, status: int, *words: str) -> str:
    """The failure is the last line of stderr, the only one but an export's progress ("[export] loading ...")."""
    *before, last = done.stderr.strip().splitlines() or [""]
    assert done.returncode == status, done.stderr
    assert last.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert all(line.startswith("[export] ") for line in before), done.stderr
    for word in words:
        assert word in last, last
    return last


@pytest.fixture(scope="module")
def port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.mark.parametrize("arguments, words", [
    (["inspect", "/nonexistent"], ["/nonexistent", "manifest.json"]),
    (["generate", "--artifacts", "/nonexistent", "Hi"], ["/nonexistent"]),
    (["generate", "--model", "nosuchmodel", "Hi"], ["unknown model spec 'nosuchmodel'"]),
    (["export", "--model", "nosuchmodel", "--out", "/nonexistent/out"], ["unknown model spec 'nosuchmodel'"]),
    (["serve", "--port", "0", "--tls-cert", "/etc/hostname"], ["--tls-key", "both"]),
    (["serve", "--port", "0", "--auth-token-file", "/nonexistent/token"], ["--auth-token-file", "/nonexistent/token"]),
    (["serve", "--port", "0", "--artifacts", "/nonexistent"], ["/nonexistent", "no such folder"]),
    (["serve", "--port", "0", "--max-batch-size", "0"], ["--max-batch-size", "0"]),
    (["serve", "--port", "0", "--speculative", "sometimes"], ["--speculative", "'sometimes'", "ngram"]),
    (["serve", "--port", "0", "--speculative", "draft:/nonexistent"], ["--speculative", "not an artifact folder"]),
    (["serve", "--port", "0", "--speculative", "draft:"], ["--speculative", "no folder", "no manifest.json"]),
    (["serve", "--port", "0", "--speculative", "draft:/etc"], ["--speculative", "/etc", "no manifest.json"]),
    (["bench-serve", "--genai", "/nonexistent"], ["--genai /nonexistent", "genai_config.json"]),
])
def test_a_mistake_is_one_line_and_status_2(arguments, words, tmp_path):
    export_output = str(tmp_path / "out")  # never created: an export that starts writes nowhere it should not
    arguments = [export_output if argument == "/nonexistent/out" else argument for argument in arguments]
    assert_one_line(gptserve(*arguments, environment={"GPTSERVE_CACHE": str(tmp_path)}), 2, *words)
    assert not Path(export_output).exists()


def test_a_hub_model_offline_is_one_line(tmp_path):
    done = gptserve("generate", "--model", "hf:gptserve-tests/nothing-here", "Hi",
                    environment={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert_one_line(done, 2, "nothing-here")


def test_a_port_in_use_is_one_line(port_in_use):
    assert_one_line(gptserve("serve", "--port", str(port_in_use)), 2, "--port", "address already in use")
    assert_one_line(gptserve("serve", "--port", "0", "--metrics-port", str(port_in_use)), 2, "--metrics-port")


def test_serving_an_unknown_model_fails_in_one_line_without_exporting(tmp_path):
    """The export runs in a child process, which says why it failed; the server adds no second error line."""
    done = gptserve("serve", "--port", "0", "--model", "nosuchmodel", environment={"GPTSERVE_CACHE": str(tmp_path)})
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and "unknown model spec" in errors[0] and done.stderr.rstrip().endswith(errors[0])


@pytest.mark.parametrize("how", [["--debug"], ["inspect-debug"], "environment"])
def test_debug_shows_the_traceback(how):
    arguments = ["inspect", "/nonexistent"]
    if how == ["--debug"]:
        arguments = ["--debug", *arguments]
    elif how == ["inspect-debug"]:
        arguments = [*arguments, "--debug"]
    done = gptserve(*arguments, environment={"GPTSERVE_DEBUG": "1"} if how == "environment" else None)
    assert done.returncode != 0 and "Traceback (most recent call last)" in done.stderr
    assert "ArtifactError: /nonexistent: no manifest.json" in done.stderr


def test_a_reader_that_leaves_early_is_no_error(tiny_artifact):
    """`gptserve inspect --json DIR | head -1`: the pipe closes before the output is written; no traceback."""
    child = subprocess.Popen([sys.executable, "-m", "gptserve", "inspect", "--json", str(tiny_artifact)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()
    assert child.wait(60) == 141 and child.stderr.read() == b""


def test_version():
    done = gptserve("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"gptserve {version('gptserve')}"


def test_help_shows_defaults_and_the_model_spec_forms():
    serve = gptserve("serve", "--help").stdout
    assert "--max-batch-size MAX_BATCH_SIZE" in serve and "(default: 8)" in " ".join(serve.split())
    assert "GPTSERVE_<FLAG>" in serve
    for command in ("generate", "export", "serve"):
        text = gptserve(command, "--help").stdout
        assert "model specs (--model):" in text and "hf:ORG/NAME" in text and "PATH/TO/FILE.gguf" in text
    generate = " ".join(gptserve("generate", "--help").stdout.split())
    assert "--temperature TEMPERATURE 0 = greedy; at most 100 (default: 0.0)" in generate


# The settings' layers, parsed in this process (parse() is what main() runs).

@pytest.fixture
def environment(monkeypatch):
    for key in list(os.environ):
        if key.startswith("GPTSERVE_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_flags_win_over_the_environment_which_wins_over_the_file(environment, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("max-batch-size: 4\nmax_queue: 7\nhost: 0.0.0.0\nprovider: cpu\n")
    environment.setenv("GPTSERVE_MAX_BATCH_SIZE", "6")
    args = parse(["serve", "--config", str(config), "--max-batch-size", "8"])
    assert (args.max_batch_size, args.max_queue, args.host, args.provider) == (8, 7, "0.0.0.0", "cpu")
    assert parse(["serve", "--config", str(config)]).max_batch_size == 6
    environment.delenv("GPTSERVE_MAX_BATCH_SIZE")
    assert parse(["serve", "--config", str(config)]).max_batch_size == 4
    assert parse(["serve"]).max_batch_size == 8 and parse(["serve"]).provider == "auto"  # ServerConfig's, argparse's
    environment.setenv("GPTSERVE_CONFIG", str(config))  # the file itself may come from the environment
    assert parse(["serve"]).max_queue == 7


def test_the_readmes_config_file_is_read_as_it_says(environment, tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    config = tmp_path / "serve.yaml"
    config.write_text(readme.split("```yaml\n", 1)[1].split("```", 1)[0])
    args = parse(["serve", "--config", str(config)])
    assert (args.model, args.max_batch_size, args.metrics_port) == ("smollm2-135m-instruct", 16, 9464)
    assert args.served_model_name == ["gpt", "smollm2"]


def test_every_kind_of_flag_from_the_environment(environment):
    environment.setenv("GPTSERVE_STALL_SECONDS", "2.5")
    environment.setenv("GPTSERVE_SERVED_MODEL_NAME", "gpt, tiny")
    environment.setenv("GPTSERVE_PRECISION", "int8")  # the name the docker compose services set
    environment.setenv("GPTSERVE_TLS_CERT", "cert.pem")
    environment.setenv("GPTSERVE_MAX_PAUSED", "")  # empty is unset, as docker compose passes unset variables
    args = parse(["serve"])
    assert (args.stall_seconds, args.served_model_name, args.precision) == (2.5, ["gpt", "tiny"], "int8")
    assert args.tls_cert == "cert.pem" and args.max_paused is None
    assert args.setting_origins["stall_seconds"] == "GPTSERVE_STALL_SECONDS"
    # A repeatable flag on the command line replaces the variable's list; it does not add to it.
    assert parse(["serve", "--served-model-name", "mine"]).served_model_name == ["mine"]


def test_a_yes_no_flag_from_the_file(environment, tmp_path):
    """serve has no yes/no flag today; the client does not layer: a parser made for the check."""
    import argparse

    from gptserve.settings import apply_layers

    parser = argparse.ArgumentParser(prog="gptserve check")
    parser.add_argument("--warm-up", action="store_true")
    config = tmp_path / "c.yaml"
    for text, expected in (("warm-up: yes", True), ("warm-up: false", False), ("warm_up: 'on'", True)):
        config.write_text(text)
        apply_layers(parser, str(config), {})
        assert parser.parse_args([]).warm_up is expected
    config.write_text("warm-up: maybe")
    with pytest.raises(SettingError, match="warm-up: 'maybe' is not a yes/no value"):
        apply_layers(parser, str(config), {})


@pytest.mark.parametrize("text, words", [
    ("max-bach-size: 4\n", ["unknown setting 'max-bach-size'"]),
    ("max-batch-size: many\n", ["max-batch-size", "'many' is not a valid int"]),
    ("provider: tpu\n", ["provider", "expected one of auto, cpu, cuda"]),
    ("port: [1, 2]\n", ["port", "expected one value"]),
    ("- port\n", ["must hold a mapping"]),
    ("port: {\n", ["not valid YAML"]),
])
def test_a_bad_config_file_is_one_line_naming_the_key(tmp_path, text, words):
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    assert_one_line(gptserve("serve", "--config", str(config)), 2, *words)


@pytest.mark.parametrize("variable, value, words", [
    ("GPTSERVE_MAX_BATCH_SIZE", "abc", ["GPTSERVE_MAX_BATCH_SIZE: 'abc' is not a valid int"]),
    ("GPTSERVE_PROVIDER", "tpu", ["GPTSERVE_PROVIDER"]),
    ("GPTSERVE_MAX_BATCH_SIZE", "0", ["GPTSERVE_MAX_BATCH_SIZE: 0; allowed 1 or more"]),  # ServerConfig's range
    ("GPTSERVE_AUTH_TOKEN", "   ", ["GPTSERVE_AUTH_TOKEN"]),
])
def test_a_bad_variable_is_one_line_naming_it(variable, value, words):
    assert_one_line(gptserve("serve", "--port", "0", environment={variable: value}), 2, *words)


def test_a_misspelt_variable_is_refused():
    assert_one_line(gptserve("serve", "--port", "0", environment={"GPTSERVE_MAX_BATCH": "16"}), 2,
                    "GPTSERVE_MAX_BATCH: no setting of `gptserve serve` has this name")


def test_every_variable_the_project_names_is_a_flags_or_known():
    """Every GPTSERVE_ name in the sources, the deployment files and the README (but in comments, which may name
    what must not be set: Kubernetes' service links) is either a serve flag's variable or one
    settings.OTHER_VARIABLES lets through, so that no deployment is refused for a variable it sets."""
    import re

    from gptserve.cli import build_parser
    from gptserve.settings import OTHER_VARIABLES, environment_name, layered_actions

    root = Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    lines = [line for path in files if not path.startswith("tests/") and (root / path).is_file()
             for line in (root / path).read_text(errors="replace").splitlines() if not line.lstrip().startswith("#")]
    named = {name for line in lines for name in re.findall(r"GPTSERVE_[A-Z][A-Z0-9_]*", line)}
    flags = {environment_name(action) for action in layered_actions(build_parser().parse_args(["serve"]).layered)}
    assert {"GPTSERVE_MAX_BATCH_SIZE", "GPTSERVE_TLS_DIR", "GPTSERVE_CACHE"} <= named
    assert named - flags - OTHER_VARIABLES == set()


def test_a_bad_value_given_as_a_flag_is_the_flags_even_when_a_variable_is_set():
    done = gptserve("serve", "--max-batch-size", "0", environment={"GPTSERVE_MAX_BATCH_SIZE": "0"})
    assert_one_line(done, 2, "--max-batch-size: 0")


def test_the_config_file_must_exist(tmp_path):
    assert_one_line(gptserve("serve", "--config", str(tmp_path / "missing.yaml")), 2, "--config", "missing.yaml")


def test_docker_compose_passes_each_flag_the_variable_of_its_name():
    """The compose file hands its settings to `gptserve serve` as flags, each from the variable the server itself
    would read for that flag: one name per setting, whichever way it is set."""
    from gptserve.cli import build_parser
    from gptserve.settings import environment_name

    serve = build_parser().parse_args(["serve"]).layered
    flags = {option: action for action in serve._actions for option in action.option_strings}
    services = load_compose(COMPOSE_FILE, None)["services"]
    checked = 0
    for name in ("gptserve", "gptserve-cpu"):
        command = [str(word) for word in services[name]["command"]]
        for flag, value in zip(command, command[1:]):
            if flag in flags and value.startswith("${"):
                assert value.startswith("${" + environment_name(flags[flag]) + ":"), (flag, value)
                checked += 1
    assert checked >= 8


def test_make_serve_takes_its_settings_and_installs_no_test_extra():
    """What `make serve` would run (make -n, the install step forced): the serving install with the export extra
    only, then `gptserve serve` with the flags its variables name, as the real parser reads them."""
    import shlex

    from gptserve.cli import build_parser

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["make", "-n", "-W", "pyproject.toml", "serve", "PORT=50052", "HTTP_PORT=0",
                           "MODEL=hf:org/name", "METRICS_PORT=9999"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    commands = done.stdout.replace("\\\n", " ").splitlines()
    installs = [command for command in commands if " install " in command and " -e " in command]
    assert installs and all("'.[export]'" in command for command in installs), installs
    (serve,) = [command for command in commands if "gptserve serve" in command]
    args = build_parser().parse_args(shlex.split(serve.split("gptserve", 1)[1]))
    assert (args.model, args.port, args.http_port, args.metrics_port) == ("hf:org/name", 50052, 0, 9999)
    default = subprocess.run(["make", "-n", "serve"], cwd=root, capture_output=True, text=True).stdout
    assert "--port" not in default and "--model" not in default  # left to gptserve's own defaults


# An export, as a user runs it.

@pytest.fixture(scope="module")
def quiet_export(tmp_path_factory, tiny_folders):
    out = tmp_path_factory.mktemp("cli-export") / "tiny-int8"
    done = gptserve("export", "--model", str(tiny_folders["llama"]), "--out", str(out), "--precision", "int8",
                    timeout=600)
    return out, done


def test_an_export_shows_its_phases_and_none_of_its_libraries_lines(quiet_export):
    out, done = quiet_export
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{out}\n"  # stdout: the result alone
    stderr = done.stderr
    for phase in ("loading", "exporting", "quantizing to int8", "certifying"):
        assert any(line.startswith(f"[export] {phase}") and "done in" in line for line in stderr.splitlines()), phase
    # The certification's steps, counted as they end: the cases, the perplexity, the canary.
    assert "decode_32 (5/8," in stderr and "canary (8/8," in stderr
    assert "parity: PASSED" in stderr and f"artifact ready: {out}" in stderr
    noise = [line for line in stderr.splitlines() if any(word in line for word in LIBRARY_NOISE)]
    assert not noise, noise


def test_verbose_shows_the_libraries_lines(tmp_path, tiny_folders):
    done = gptserve("export", "-v", "--model", str(tiny_folders["llama"]), "--out", str(tmp_path / "tiny"),
                    "--precision", "int8", timeout=600)
    assert done.returncode == 0, done.stderr
    assert "matmul_nbits_quantizer" in done.stderr  # ONNX Runtime's quantizer, one INFO line per node
    assert "[export] certifying" in done.stderr


def test_a_failed_certification_is_status_1_after_its_report(tmp_path, tiny_folders):
    """A tiny random model's int4 graph misses the real models' agreement bar (0.49 against 0.6): the export ran as
    asked and its result failed, which is not a usage mistake."""
    out = tmp_path / "tiny-int4"
    done = gptserve("export", "--model", str(tiny_folders["llama"]), "--out", str(out), "--precision", "int4",
                    timeout=600)
    *report, last = done.stderr.strip().splitlines()
    assert done.returncode == 1 and last.startswith("error: parity certification failed"), done.stderr
    assert "Traceback" not in done.stderr and "top-1 agreement over all cases" in "\n".join(report)
    assert "(>= 0.6: NOT met)" in done.stderr and done.stdout == "" and not out.exists()


def test_inspect_says_what_the_verdict_was_judged_on(quiet_export):
    out, _ = quiet_export
    done = gptserve("inspect", str(out))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "parity: PASSED" in text and "judged on:" in text
    assert "top-1 agreement over all cases:" in text and "(>= 0.95: met)" in text
    assert "perplexity ratio on canary.txt:" in text and "(<= 1.05: met)" in text
    assert "per case (information only" in text  # rows reading "greedy DIFFER" are not what was judged
    report = json.loads(gptserve("inspect", "--json", str(out)).stdout)
    verdict, parity = report["verdict"], report["parity"]
    assert verdict["passed"] is parity["passed"] is True and report["precision"] == "int8"
    agreement, ratio = verdict["judged_on"]
    assert agreement["measured"] == round(parity["top1_agreement"], 4) and agreement["met"] is True
    assert ratio["measured"] == round(parity["perplexity"]["ratio"], 4) and ratio["bound"] == "<= 1.05"


def test_inspect_says_what_an_fp32_verdict_was_judged_on(tiny_artifact):
    text = gptserve("inspect", str(tiny_artifact)).stdout
    assert "largest max abs logits difference:" in text and "(<= 1e-05: met)" in text
    assert "cases with identical greedy tokens: 6 of 6 (all: met)" in text


def test_a_verdict_names_what_failed_and_an_fp16_one_its_structure():
    from gptserve.export.artifact import format_report, judgements
    from gptserve.export.manifest import ParityCase, ParityReport, Perplexity

    case = ParityCase("decode_32", 32, 2.5, 0.5, False)
    failed = ParityReport(precision="int4", reference="eager PyTorch float64", runtime="onnxruntime",
                          criteria={"min_top1_agreement": 0.6, "max_perplexity_ratio": 1.3}, cases=(case,),
                          top1_agreement=0.5, perplexity=Perplexity("canary.txt", 256, 20.0, 25.0, 1.25),
                          contract_mismatches=(), passed=False)
    assert [(item.measured, item.met) for item in judgements(failed)] == [(0.5, False), (1.25, True)]
    text = format_report(failed)
    assert "parity: FAILED" in text and "top-1 agreement over all cases: 0.5 (>= 0.6: NOT met)" in text
    fp16 = ParityReport(precision="fp16", reference="none", runtime="onnx.checker", criteria={"structure": "valid"},
                        cases=(), top1_agreement=None, perplexity=None, contract_mismatches=("logits",), passed=False)
    (structure,) = judgements(fp16)
    assert structure.measured == "1 mismatched" and not structure.met
    assert "contract mismatches: logits" in format_report(fp16)


# Run as `python -c`: prints its pid and GLIBC_TUNABLES at start, then runs the program (`gptserve --version`).
RESTARTING = ("import os, sys; print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True); "
              "sys.argv = ['gptserve', '--version']; from gptserve.cli import main; main()")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's tunables")
@pytest.mark.parametrize(("given", "wanted"), [
    (None, "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1"),
    ("glibc.malloc.tcache_count=0", "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1"),
    ("glibc.malloc.hugetlb=0", None),  # the opt-out: no restart
])
def test_the_program_restarts_once_on_huge_pages_in_the_same_process(given, wanted):
    environment = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", RESTARTING], capture_output=True, text=True, timeout=60,
                          env={**environment, **({"GLIBC_TUNABLES": given} if given else {})})
    assert done.returncode == 0, done.stderr
    *starts, printed_version = done.stdout.splitlines()
    assert printed_version == f"gptserve {version('gptserve')}"
    pids = {line.split()[0] for line in starts}
    seen = [line.split(maxsplit=1)[1] for line in starts]
    assert len(pids) == 1  # exec: the same process, so signals and a container's pid 1 still reach it
    assert seen == ([str(given), wanted] if wanted else [given])


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
                    or "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
                    reason="this kernel gives no transparent huge pages")
def test_the_served_weights_lie_in_huge_pages(default_artifact):
    """The server loads its engine on a thread of its own: one malloc arena keeps its weights in huge pages too."""
    from gptserve.service.bench import free_port
    from gptserve.service.client import GenerationClient

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gptserve", "serve", "--artifacts", str(default_artifact),
                               "--port", str(port), "--http-port", "0", "--speculative", "off"],
                              env={key: value for key, value in os.environ.items()
                                   if not key.startswith("GPTSERVE_") and key != "GLIBC_TUNABLES"})
    try:
        with GenerationClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(timeout=120)
        rollup = Path(f"/proc/{server.pid}/smaps_rollup").read_text()
        huge = next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("AnonHugePages:"))
        assert huge > 400 * 1024, rollup  # kB: most of the 540 MB of fp32 weights
    finally:
        server.terminate()
        server.wait(60)
