"""The `gptserve` command: thin subcommands over the library (model/, export/, service/).

Heavy imports (torch, onnxruntime, grpc) happen inside the subcommands, so each pays only for what it uses
and the serving commands never import torch. Defaults come from the library (ServerConfig, SamplingParams,
StoppingParams), never restated here. A mistake in the flags is one line on stderr and exit status 2, found before
anything is loaded; any other failure is one line too (`--debug` or GPTSERVE_DEBUG=1 shows its traceback).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib.util
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, cast

from gptserve.model.fetch import DEFAULT_MODEL

USAGE_ERROR = 2
FAILURE = 1
# Failures a user causes (a path, a model spec, a setting, an unreachable hub), by module and class: one line and
# exit status 2. Looked up only in modules already imported: an error of a module never loaded cannot have been
# raised, and importing model.checkpoint to check would import torch into the server.
USER_ERRORS = {
    "gptserve.export.artifact": "ArtifactError",
    "gptserve.model.checkpoint": "CheckpointError",
    "gptserve.model.sampling": "ParameterError",
    "gptserve.model.tokenizer": "TokenizerError",
    "gptserve.service.errors": "ConfigError",
    "gptserve.settings": "SettingError",
}
# ServerConfig fields whose flag is not simply the field's name.
SERVE_FLAGS = {"tls_cert_file": "--tls-cert", "tls_key_file": "--tls-key", "auth_token": "--auth-token-file"}


# The numeric serve flags: each sets the ServerConfig field of its name, whose default and range it takes.
SERVE_NUMBERS: dict[str, tuple[type, str]] = {
    "port": (int, "gRPC port; 0 picks a free port"),
    "http_port": (int, "OpenAI-compatible HTTP API port (/v1/chat/completions, /v1/completions, /health); 0 = off"),
    "max_batch_size": (int, "sequences stepped together"),
    "max_queue": (int, "requests waiting for a slot; more get RESOURCE_EXHAUSTED"),
    "max_unread_tokens": (int, "a stream whose client has this many tokens unread is paused until it reads"),
    "max_paused": (int, "paused streams that give up their slots (default: --max-batch-size)"),
    "stall_seconds": (float, "a stream whose client reads nothing this long is ended (RESOURCE_EXHAUSTED)"),
    "prefill_chunk_tokens": (int, "prompt tokens read per engine step at most (long prompts are read in chunks)"),
    "prefill_step_seconds": (float, "what a prompt chunk aims to take: the pause running streams see while a "
                                    "prompt is read"),
    "prefix_cache_mb": (int, "MiB of prompts' KV kept to reuse for prompts that start the same way "
                             "(chat histories, shared system prompts); least recently used blocks go first; 0 = off"),
    "default_max_new_tokens": (int, "when a request does not say"),
    "max_stop_strings": (int, "stop strings one request may send"),
    "max_message_bytes": (int, "largest request or response message"),
    "stats_seconds": (float, "a log line of throughput, load and KV use this often while busy; 0 = never"),
}


def flag_for(setting: str) -> str:
    """The serve flag that sets a ServerConfig field (a flag or an environment variable stays as it is)."""
    if setting in SERVE_FLAGS:
        return SERVE_FLAGS[setting]
    return "--" + setting.strip("-").replace("_", "-") if setting.islower() else setting


def setting_source(setting: str, args: argparse.Namespace) -> str:
    """Where a refused setting came from: its flag, or the variable or config key that set it."""
    flag = flag_for(setting)
    return getattr(args, "setting_origins", {}).get(flag.removeprefix("--").replace("-", "_"), flag)


def fail(message: str, status: int = USAGE_ERROR) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message held
    return status


def loaded_class(module: str, name: str) -> type | None:
    return getattr(sys.modules[module], name) if module in sys.modules else None


def is_user_error(error: BaseException) -> bool:
    return any(isinstance(error, kind) for kind in (loaded_class(*entry) for entry in USER_ERRORS.items()) if kind)


def report_failure(error: Exception, args: argparse.Namespace) -> int:
    """The one line a failure ends with: its message (a ConfigError names the flag, variable or key it came from)."""
    export_failed = loaded_class("gptserve.service.artifacts", "ExportFailed")
    if export_failed and isinstance(error, export_failed):
        return cast(Any, error).status  # the export's own process has said why, in its one line
    config_error = loaded_class("gptserve.service.errors", "ConfigError")
    if config_error and isinstance(error, config_error):
        refused = cast(Any, error)  # a ConfigError, known by the class of its loaded module
        return fail(f"{setting_source(refused.setting, args)}: {refused.problem}")
    certification_failed = loaded_class("gptserve.export.exporter", "CertificationFailed")
    if is_user_error(error):
        return fail(str(error), FAILURE if certification_failed and isinstance(error, certification_failed)
                    else USAGE_ERROR)
    if isinstance(error, OSError) and error.filename is not None:
        return fail(f"{error.filename}: {error.strerror}", FAILURE)
    return fail(f"{type(error).__name__}: {error} (a bug: run again with --debug for the traceback to report)",
                FAILURE)


def add_request_flags(parser: argparse.ArgumentParser) -> None:
    """A one-shot generation's flags: the prompt, how to read it, and the sampling flags."""
    parser.add_argument("prompt", help="the prompt text (or the user message, with --chat)")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message through the chat template")
    parser.add_argument("--parse-special-tokens", action="store_true",
                        help="a plain prompt's special-token text (e.g. <|im_start|>) becomes control tokens; "
                             "without, it is text (a chat's control tokens always come from its template)")
    add_sampling_flags(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """How each reply is generated, for `generate`, `client` and `chat` alike."""
    from gptserve.model.generation import StoppingParams
    from gptserve.model.sampling import MAX_TEMPERATURE, SamplingParams

    sampling, stopping = SamplingParams(), StoppingParams()
    parser.add_argument("--system", help="a system message before the user's (implies --chat)")
    parser.add_argument("--logprobs", action="store_true",
                        help="each token's log-probability: in the JSON, or after the reply on stderr")
    parser.add_argument("--max-new-tokens", type=int, default=stopping.max_new_tokens,
                        help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=sampling.temperature,
                        help=f"0 = greedy; at most {MAX_TEMPERATURE:g}")
    parser.add_argument("--top-k", type=int, default=sampling.top_k, help="0 = no top-k cut")
    parser.add_argument("--top-p", type=float, default=sampling.top_p, help="nucleus: the smallest set of tokens "
                                                                           "this likely together; 1 = no cut")
    parser.add_argument("--repetition-penalty", type=float, default=sampling.repetition_penalty,
                        help="above 1, tokens already seen are less likely; 1 = none")
    parser.add_argument("--seed", type=int, default=sampling.seed, help="for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token")


def request_params(args: argparse.Namespace):
    from gptserve.model.generation import StoppingParams
    from gptserve.model.sampling import SamplingParams

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    stopping = StoppingParams(args.max_new_tokens, tuple(args.stop), args.ignore_eos)
    return sampling, stopping


def run_generate(args: argparse.Namespace) -> int:
    import time

    from gptserve.model.generation import Sequence, StepFunction, TokenEvent, generate
    from gptserve.service.client import print_logprobs, reply_json

    sampling, stopping = request_params(args)  # before the model is loaded: a mistake costs no time
    chat = args.chat or args.system is not None
    if chat and args.parse_special_tokens:
        return fail("--parse-special-tokens applies to a plain prompt, not to --chat or --system")
    step: StepFunction  # the engine's, or the eager model's
    if args.artifacts:
        from gptserve.service.engine import Engine

        engine = Engine.load(args.artifacts)
        step, tokenizer, context_length = engine.step, engine.tokenizer, engine.context_length
    else:
        from gptserve.model.eager import EagerStep
        from gptserve.model.spec import load_pretrained

        pretrained = load_pretrained(args.model)
        step, tokenizer = EagerStep(pretrained.build()), pretrained.tokenizer
        context_length = pretrained.config.context_length
    if chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt_ids, _ = tokenizer.encode_chat([*system, {"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt, parse_special_tokens=args.parse_special_tokens)
    if len(prompt_ids) + stopping.max_new_tokens > context_length:
        return fail(f"{len(prompt_ids)} prompt tokens + max_new_tokens {stopping.max_new_tokens} exceed the context "
                    f"length {context_length}")
    started, first_token_at, texts = time.perf_counter(), list[float](), list[str]()

    def on_token(event: TokenEvent) -> None:
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        texts.append(event.text)
        if not args.json:
            print(event.text, end="", flush=True)

    result = generate(step, Sequence(tokenizer, prompt_ids, sampling, stopping), on_token=on_token)
    total, first = time.perf_counter() - started, first_token_at[0] - started
    if args.json:
        print(json.dumps(reply_json(
            request_id=None, text=result.text, token_ids=result.token_ids, finish_reason=result.finish_reason.value,
            prompt_tokens=result.prompt_tokens, time_to_first_token_s=first, total_s=total,
            logprobs=result.logprobs if args.logprobs else None)))
        return 0
    print(flush=True)  # the reply's own line ends
    if args.logprobs:
        print_logprobs(result.token_ids, result.logprobs, texts)
    print(f"[{result.finish_reason.value}: {len(result.token_ids)} tokens, first token {first * 1000:.0f} ms, "
          f"total {total:.2f} s]", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from gptserve.export.exporter import export
    from gptserve.export.progress import quiet_libraries

    quiet_libraries(args.verbose)
    export(args.model, args.out, tolerance=args.tolerance, context_length=args.max_context, precision=args.precision)
    print(args.out)  # stdout: the result alone; what happened on the way is on stderr
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from gptserve.export.artifact import format_report, judgements, read_manifest

    manifest = read_manifest(args.artifacts)
    if args.json:
        verdict = {"passed": manifest.parity.passed,
                   "judged_on": [dataclasses.asdict(item) for item in judgements(manifest.parity)]}
        print(json.dumps({**manifest.to_json(), "verdict": verdict}, indent=2))
        return 0 if manifest.parity.passed else 1
    model, graph = manifest.model, manifest.graph
    print(f"{model.name} ({model.config.architecture}, {manifest.precision}), from {model.source}")
    print(f"graph: {graph.file}, opset {graph.opset}, {graph.n_layer} layers, KV {graph.kv_layout} "
          f"with {graph.n_kv_heads} heads of {graph.head_dim}; context {manifest.generation.context_length}")
    print("tools: " + ", ".join(f"{name} {version}" for name, version in manifest.tools.items()))
    print(format_report(manifest.parity))
    return 0 if manifest.parity.passed else 1


def serve_config(args: argparse.Namespace):
    """The ServerConfig the serve flags describe, checked: every mistake a ConfigError naming its setting."""
    from gptserve.service.client import read_token
    from gptserve.service.errors import ConfigError
    from gptserve.service.server import ServerConfig

    for flag, value, minimum in (("--threads", args.threads, 1), ("--device-id", args.device_id, 0),
                                 ("--gpu-mem-limit", args.gpu_mem_limit, 0)):
        if value is not None and value < minimum:
            raise ConfigError(flag, f"{value}; allowed {minimum} or more")
    return ServerConfig(
        host=args.host, **{name: getattr(args, name) for name in SERVE_NUMBERS},
        served_model_names=tuple(args.served_model_name),
        tls_cert_file=args.tls_cert, tls_key_file=args.tls_key, auth_token=read_token(args.auth_token_file),
        metrics_port=args.metrics_port or None, metrics_host=args.metrics_host, grace_seconds=args.grace_seconds,
        otlp_endpoint=args.otlp_endpoint, speculative=args.speculative,
    )


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from gptserve.service.artifacts import default_precision, ensure_artifact
    from gptserve.service.engine import Engine
    from gptserve.service.logs import configure as configure_logging
    from gptserve.service.server import serve
    from gptserve.service.startup import check_start

    # Everything that can be wrong with the flags, before an export or a model load takes minutes.
    config = serve_config(args)
    check_start(config)
    configure_logging(args.log_level, args.log_format)
    # The default model only when no folder is named: a folder alone is served as it is, or refused.
    model = args.model or (None if args.artifacts else DEFAULT_MODEL)
    folder = ensure_artifact(args.artifacts, model, args.precision or default_precision(args.provider))
    if config.speculative.startswith("draft:"):  # two models take turns on the cores: one pool for both
        from gptserve.export.runtime import share_threads

        share_threads(args.threads)
    load = lambda: Engine.load(folder, args.provider, args.threads, args.device_id, args.gpu_mem_limit or None)
    return asyncio.run(serve(config, load))  # a ConfigError here: the port was taken between the check and the bind


def run_client(args: argparse.Namespace) -> int:
    from gptserve.service.client import run_client as stream_to_terminal

    return stream_to_terminal(args)


def run_chat(args: argparse.Namespace) -> int:
    from gptserve.service.client import run_chat as converse

    return converse(args)


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    parser.add_argument("--token-file", help="bearer token file (default: $GPTSERVE_AUTH_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    parser.add_argument("--tls-ca", help="TLS, trusting this PEM certificate (e.g. the server's self-signed one)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds, per reply")


def run_bench_serve(args: argparse.Namespace) -> int:
    from gptserve.service.artifacts import ensure_artifact
    from gptserve.service.bench import run_bench, run_bench_target

    if args.target:
        if len(args.protocol) != 1:
            return fail("--target: name the one --protocol it speaks (grpc or openai)")
        if args.genai:
            return fail("--genai: measured beside an artifact in this process, not with --target")
        return run_bench_target(args)
    if args.genai and not (Path(args.genai) / "genai_config.json").is_file():
        return fail(f"--genai {args.genai}: no genai_config.json there; give an onnxruntime-genai model folder")
    return run_bench(ensure_artifact(args.artifacts, args.model), args)


def run_benchmark(args: argparse.Namespace) -> int:
    from gptserve.bench.run import run_bench

    return run_bench(args)


def add_bench_command(commands) -> None:
    bench = commands.add_parser("bench", help="prefill, decode tokens/s and memory: ours vs transformers, "
                                              "onnxruntime-genai and llama.cpp, side by side, one process per figure")
    bench.add_argument("--systems", help="comma-separated subset (default: all): eager, onnx-fp32, onnx-int4, each "
                                         "--ours NAME, transformers, genai-fp32, genai-int4, llama.cpp")
    bench.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    bench.add_argument("--repeats", type=int, default=5, help="processes per system and batch size")
    bench.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per decode (EOS suppressed)")
    bench.add_argument("--artifacts", help="our fp32 artifact for onnx-fp32 (default: exported into the cache)")
    bench.add_argument("--ours", action="append", default=[], metavar="NAME=DIR",
                       help="one of our artifacts to measure as system NAME (repeatable; onnx-int4=DIR replaces the "
                            "int4 export)")
    bench.add_argument("--threads", type=int, default=None, help="intra-op threads of every system (default: cores)")
    bench.add_argument("--results", default="bench-results",
                       help="where bench.json, bench.png and the cache of exports and conversions go")
    bench.set_defaults(run=run_benchmark)


def add_service_commands(commands) -> None:
    """serve, client and bench-serve: the gRPC server and its two callers."""
    from gptserve.export.quantize import PRECISIONS
    from gptserve.service.logs import LOG_FORMATS
    from gptserve.service.server import ServerConfig

    defaults = ServerConfig()
    serve = commands.add_parser("serve", help="serve an artifact over gRPC (exporting --model first if needed)")
    serve.add_argument("--artifacts", help="artifact folder to serve; with --model, exported into it when it is "
                                          "absent or empty")
    serve.add_argument("--model", default=None,
                       help=f"model spec to export and serve (cached under ~/.cache/gptserve; default {DEFAULT_MODEL} "
                            "when no --artifacts is given)")
    serve.add_argument("--host", default=defaults.host,
                       help="0.0.0.0 to listen on every interface (use TLS and a token)")
    for name, (kind, text) in SERVE_NUMBERS.items():
        serve.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name), help=text)
    serve.add_argument("--served-model-name", action="append", default=list(defaults.served_model_names),
                       help="another name the HTTP API accepts as `model` (repeatable)")
    serve.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"], help="ONNX Runtime provider")
    serve.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    serve.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="precision of the export made for --model (default: $GPTSERVE_PRECISION, else fp16 "
                            "on CUDA and fp32 on CPU)")
    serve.add_argument("--device-id", type=int, default=0, help="CUDA device")
    serve.add_argument("--gpu-mem-limit", type=int, default=0, help="CUDA memory arena limit in bytes; 0 = none")
    serve.add_argument("--tls-cert", help="PEM certificate chain file: serve over TLS (with --tls-key)")
    serve.add_argument("--tls-key", help="PEM private key file")
    serve.add_argument("--auth-token-file", help="require 'authorization: Bearer TOKEN' with the token in this "
                                                 "file (default: $GPTSERVE_AUTH_TOKEN if set, else no token); "
                                                 "an empty or blank token refuses to start")
    serve.add_argument("--metrics-port", type=int, default=defaults.metrics_port or 0,
                       help="Prometheus /metrics HTTP port; 0 = off")
    serve.add_argument("--metrics-host", default=defaults.metrics_host, help="address of the /metrics endpoint")
    serve.add_argument("--grace-seconds", type=float, default=defaults.grace_seconds,
                       help="on SIGTERM/SIGINT, how long streams in flight may take to finish")
    serve.add_argument("--speculative", default=defaults.speculative, metavar="ngram|draft:DIR|off",
                       help="lossless speculative decoding while one stream runs: guesses from prompt lookup "
                            "(ngram) or a draft artifact sharing the model's tokenizer (draft:DIR), verified in "
                            "one forward")
    serve.add_argument("--otlp-endpoint", default=defaults.otlp_endpoint,
                       help="trace requests (queue, prefill, decode) to this OpenTelemetry OTLP/gRPC collector, "
                            "e.g. http://127.0.0.1:4317 (needs gptserve[otel])")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="the server log's threshold")
    serve.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                       help="json: one JSON object per line (request lines and stats with their fields on top)")
    serve.add_argument("--config", help="YAML file of settings, keyed by flag (`max-batch-size: 16`); every flag "
                                        "is also read from GPTSERVE_<FLAG> (GPTSERVE_MAX_BATCH_SIZE=16). Flags "
                                        "win over the environment, the environment over the file")
    serve.set_defaults(run=run_serve, layered=serve)

    client = commands.add_parser("client", help="stream a generation from a running server to the terminal")
    add_request_flags(client)
    add_connection_flags(client)
    client.set_defaults(run=run_client)

    chat = commands.add_parser("chat", help="talk with a running server: each line of stdin is a user turn, each "
                                            "reply streams back, the conversation is kept (Ctrl-D ends it)")
    add_sampling_flags(chat)
    add_connection_flags(chat)
    chat.set_defaults(run=run_chat)

    bench = commands.add_parser("bench-serve", help="load-test the server (gRPC and the OpenAI HTTP API) against "
                                                    "the in-process engine, or a running server with --target")
    bench.add_argument("--target", help="host:port of a running server to measure instead (behind nginx, TLS and "
                                        "a token allowed); its served figures only")
    bench.add_argument("--protocol", nargs="+", choices=["grpc", "openai"], default=["grpc", "openai"],
                       help="the served paths to measure (one with --target)")
    bench.add_argument("--token-file", help="bearer token file for --target (default: $GPTSERVE_AUTH_TOKEN)")
    bench.add_argument("--tls", action="store_true", help="--target over TLS with the system's root certificates")
    bench.add_argument("--tls-ca", help="--target over TLS, trusting this PEM certificate")
    bench.add_argument("--artifacts", help="artifact folder (default: the cached export of --model)")
    bench.add_argument("--model", default=DEFAULT_MODEL, help="model spec, exported into the cache on first use")
    bench.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrent streams")
    bench.add_argument("--max-new-tokens", type=int, default=64, help="tokens per request (EOS ignored)")
    bench.add_argument("--rounds", type=int, default=2, help="requests per stream at each concurrency")
    bench.add_argument("--repeats", type=int, default=3, help="times every path is measured, in turn (medians)")
    bench.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    bench.add_argument("--genai", help="an onnxruntime-genai model folder of the same model (as `gptserve bench` "
                                       "builds into bench-results/cache/genai-fp32): measured beside, in process")
    bench.add_argument("--json", help="also write the figures to this JSON file")
    bench.set_defaults(run=run_bench_serve)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, where there is one to show (not None or False, not already said)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        nothing_to_show = action.default is None or action.default is False or action.default == []
        if nothing_to_show or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


@functools.cache
def model_spec_help() -> str:
    """The model-spec forms, as model/spec.py's docstring lists them: read from its source, since importing it
    imports torch, which `serve --help` must not."""
    spec = importlib.util.find_spec("gptserve.model.spec")
    assert spec is not None and spec.origin is not None  # a module of this package
    docstring = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")), clean=False) or ""
    forms = [line for line in docstring.splitlines() if line.startswith("  ")]
    return "model specs (--model):\n" + "\n".join(forms)


class CommandParser(argparse.ArgumentParser):
    """A command's parser: defaults in its --help, and --debug after the command's name too (`serve --debug`)."""

    def __init__(self, **settings) -> None:
        super().__init__(formatter_class=HelpFormatter, **settings)
        # SUPPRESS: unset here, so that `gptserve --debug serve` is not undone by this parser's default.
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show a failure's traceback (also GPTSERVE_DEBUG=1)")


def package_version() -> str:
    try:
        return version("gptserve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from gptserve.export.quantize import PRECISIONS

    parser = argparse.ArgumentParser(prog="gptserve", description="GPT models on ONNX Runtime, served over gRPC.",
                                     formatter_class=HelpFormatter, epilog=model_spec_help())
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--debug", action="store_true", help="show a failure's traceback (also GPTSERVE_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    generate = commands.add_parser("generate", help="generate text locally (eager PyTorch or an ONNX artifact)")
    source = generate.add_mutually_exclusive_group()
    source.add_argument("--model", default=DEFAULT_MODEL, help="model spec (eager PyTorch)")
    source.add_argument("--artifacts", help="an exported artifact folder (ONNX Runtime engine)")
    add_request_flags(generate)
    generate.set_defaults(run=run_generate)

    export = commands.add_parser("export", help="export a model to a parity-certified ONNX artifact folder")
    export.add_argument("--model", default=DEFAULT_MODEL, help="model spec")
    export.add_argument("--out", required=True, help="the artifact folder to write")
    export.add_argument("--max-context", type=int, default=None, help="cap the context length")
    export.add_argument("--tolerance", type=float, default=1e-4, help="fp32 max abs logits difference allowed")
    export.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="int8/int4: weight-only MatMulNBits for CPU; fp16: for GPUs (certified structurally)")
    export.add_argument("-v", "--verbose", action="store_true",
                        help="also show what torch, onnxscript and ONNX Runtime log and warn while exporting")
    export.set_defaults(run=run_export)

    inspect = commands.add_parser("inspect", help="show an artifact's manifest and parity report")
    inspect.add_argument("artifacts", help="the artifact folder")
    inspect.add_argument("--json", action="store_true",
                         help="the manifest as JSON, with the verdict and what it was judged on")
    inspect.set_defaults(run=run_inspect)

    add_service_commands(commands)
    add_bench_command(commands)
    for command in commands.choices.values():
        if any("--model" in action.option_strings for action in command._actions):
            command.epilog = model_spec_help()
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The flags, over GPTSERVE_<FLAG> variables and the --config file for the commands that take them."""
    from gptserve.settings import apply_layers

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "layered", None) is None:
        return args
    # A flag given on the command line wins outright (a repeatable one too, rather than adding to the layers').
    given = {action.dest for action in args.layered._actions for word in argv
             for option in action.option_strings if word == option or word.startswith(option + "=")}
    origins = apply_layers(args.layered, args.config or os.environ.get("GPTSERVE_CONFIG"), os.environ, given)
    args = parser.parse_args(argv)
    args.setting_origins = origins
    return args


# glibc tunables for the weights' memory: transparent huge pages, and one malloc arena (the weights are loaded on a
# thread of their own, and glibc asks for huge pages in its main arena, not in the arenas of other threads).
HUGE_PAGES = {"glibc.malloc.hugetlb": "1", "glibc.malloc.arena_max": "1"}


def restart_with_huge_pages() -> None:
    """Re-executes this program (same pid, arguments and environment) with glibc's malloc asking for transparent
    huge pages: every decode step streams all the weights (540 MB at fp32), and with 4 KiB pages their TLB misses
    cost 5 to 8% of a step here (fp32 and int4, batch 1 and 8). glibc reads GLIBC_TUNABLES only when a process
    starts, hence the restart. Nothing happens where the variable already names glibc.malloc.hugetlb (=0 opts out),
    and other C libraries ignore it. The KV buffers' room then becomes resident in 2 MiB pages, still within the
    bound the README gives (slots x context length x the KV bytes of a position)."""
    tunables = [item for item in os.environ.get("GLIBC_TUNABLES", "").split(":") if item]
    named = {item.split("=", 1)[0] for item in tunables}
    if not sys.platform.startswith("linux") or not sys.executable or "glibc.malloc.hugetlb" in named:
        return
    tunables += [f"{name}={value}" for name, value in HUGE_PAGES.items() if name not in named]
    os.environ["GLIBC_TUNABLES"] = ":".join(tunables)
    sys.stdout.flush()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:  # cannot run itself again (an unusual install): it runs on, in 4 KiB pages
        pass


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the program itself, not a caller passing arguments in process
        restart_with_huge_pages()
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("GPTSERVE_DEBUG", "") not in ("", "0")
    args = None
    try:
        args = parse(argv)
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout's reader left (`| head`): nothing to report, and nothing left to flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as the shell reports a process ended by SIGPIPE
    except Exception as error:
        if debug:
            raise
        return report_failure(error, args or argparse.Namespace())


if __name__ == "__main__":
    sys.exit(main())
