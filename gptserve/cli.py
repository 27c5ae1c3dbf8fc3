"""The `gptserve` command: thin subcommands over the library (model/, export/, service/).

Heavy imports (torch, onnxruntime, grpc) happen inside the subcommands, so each pays only for what it uses
and the serving commands never import torch.
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_request_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text (or the user message, with --chat)")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")


def request_params(args: argparse.Namespace):
    from model.generation import StoppingParams
    from model.sampling import SamplingParams

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    stopping = StoppingParams(args.max_new_tokens, tuple(args.stop), args.ignore_eos)
    return sampling, stopping


def run_generate(args: argparse.Namespace) -> int:
    from model.generation import Sequence, generate

    if args.artifacts:
        from service.engine import Engine

        engine = Engine.load(args.artifacts)
        step, tokenizer, context_length = engine.step, engine.tokenizer, engine.context_length
    else:
        from model.eager import EagerStep
        from model.spec import load_pretrained

        pretrained = load_pretrained(args.model)
        step, tokenizer = EagerStep(pretrained.build()), pretrained.tokenizer
        context_length = pretrained.config.context_length
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    prompt_ids = tokenizer.encode(prompt)
    sampling, stopping = request_params(args)
    if len(prompt_ids) + stopping.max_new_tokens > context_length:
        print(f"error: {len(prompt_ids)} prompt tokens + max_new_tokens {stopping.max_new_tokens} exceed "
              f"the context length {context_length}", file=sys.stderr)
        return 2
    stream = None if args.json else (lambda event: print(event.text, end="", flush=True))
    result = generate(step, Sequence(tokenizer, prompt_ids, sampling, stopping), on_token=stream)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"\n[{result.finish_reason.value}: {len(result.token_ids)} tokens]", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from export.exporter import export

    export(args.model, args.out, tolerance=args.tolerance, context_length=args.max_context)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from export.artifact import format_report, read_manifest

    manifest = read_manifest(args.artifacts)
    model, graph = manifest["model"], manifest["graph"]
    print(f"{model['name']} ({model['config']['architecture']}, {manifest['precision']}), from {model['source']}")
    print(f"graph: {graph['file']}, opset {graph['opset']}, {graph['n_layer']} layers, KV {graph['kv_layout']} "
          f"with {graph['n_kv_heads']} heads of {graph['head_dim']}; context {manifest['generation']['context_length']}")
    print("tools: " + ", ".join(f"{name} {version}" for name, version in manifest["tools"].items()))
    print(format_report(manifest["parity"]))
    return 0 if manifest["parity"]["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptserve", description="GPT models on ONNX Runtime, served over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)

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
    export.set_defaults(run=run_export)

    inspect = commands.add_parser("inspect", help="show an artifact's manifest and parity report")
    inspect.add_argument("artifacts")
    inspect.set_defaults(run=run_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
