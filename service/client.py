"""A small client for programs (`GenerationClient`) and the `gptserve client` command that streams to a terminal."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gptserve.service.errors import ConfigError
from gptserve.v1 import generation_pb2 as pb
from gptserve.v1 import generation_pb2_grpc as pb_grpc

TOKEN_ENVIRONMENT = "GPTSERVE_AUTH_TOKEN"
# Channel options of a client that wants the server to see at once when it stops reading: a 1 KiB HTTP/2 window
# that never grows, so the server's writes wait (and its stream pauses) instead of filling grpc's default window,
# which grows to megabytes. Plenty for token streams; not for large unary replies over long distances.
SMALL_WINDOW = (("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0))
FINISH_REASON_NAMES = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_EOS: "eos"}


class ResponseStream(Iterator[pb.GenerateStreamResponse], Protocol):
    """A GenerateStream call: its messages as they arrive, and cancel() to end it on the server."""

    def cancel(self) -> bool: ...


def build_request(
    prompt: str | None = None,
    *,
    messages: list[dict] | None = None,
    prompt_token_ids: list[int] | None = None,
    request_id: str = "",
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: list[str] | tuple[str, ...] = (),
    ignore_eos: bool = False,
    return_logprobs: bool = False,
    parse_special_tokens: bool = False,
) -> pb.GenerateRequest:
    """A GenerateRequest from plain values; None leaves a field unset (the server's default).
    `parse_special_tokens`: a trusted prompt's special-token text becomes control tokens (else it is text)."""
    if sum(value is not None for value in (prompt, messages, prompt_token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages or prompt_token_ids")
    request = pb.GenerateRequest(request_id=request_id, return_logprobs=return_logprobs,
                                 parse_special_tokens=parse_special_tokens)
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.messages.messages.extend(
            pb.ChatMessage(role=item["role"], content=item["content"]) for item in messages)
    else:
        request.prompt_token_ids.ids.extend(prompt_token_ids)
    # The constructor takes field=None as no field at all: None leaves the field unset.
    request.sampling.CopyFrom(pb.SamplingParameters(temperature=temperature, top_k=top_k, top_p=top_p,
                                                    repetition_penalty=repetition_penalty, seed=seed))
    request.stopping.CopyFrom(pb.StoppingCriteria(stop=list(stop), ignore_eos=ignore_eos))
    if max_new_tokens is not None:
        request.stopping.max_new_tokens = max_new_tokens
    return request


def channel_credentials(tls: bool, ca_file: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials trusting `ca_file` (else the system's roots); None for a plaintext channel."""
    if not (tls or ca_file):
        return None
    return grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes() if ca_file else None)


class GenerationClient:
    """A blocking client over one channel. With `root_certificates` (PEM bytes) or `tls=True` it uses TLS;
    `token` is sent as `authorization: Bearer TOKEN`."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False, timeout: float | None = None,
                 options: Sequence[tuple[str, object]] | None = None) -> None:
        if root_certificates is not None or tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.TextGenerationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def stream(self, prompt: str | None = None, **options) -> ResponseStream:
        """The stream's messages as they arrive; `options` as for `build_request`. Closing the iterator early
        (or `.cancel()` on it) cancels the request on the server."""
        return self.stub.GenerateStream(build_request(prompt, **options), timeout=self.timeout,
                                        metadata=self.metadata)

    def generate(self, prompt: str | None = None, **options) -> pb.GenerateResponse:
        return self.stub.Generate(build_request(prompt, **options), timeout=self.timeout, metadata=self.metadata)

    def tokenize(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 parse_special_tokens: bool = False) -> pb.TokenizeResponse:
        request = pb.TokenizeRequest(parse_special_tokens=parse_special_tokens)
        if messages is not None:
            request.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        else:
            request.prompt = prompt or ""
        return self.stub.Tokenize(request, timeout=self.timeout, metadata=self.metadata)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def health(self, service: str = "") -> str:
        """"SERVING", "NOT_SERVING", ... of the standard health service."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 300.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        watch = self.health_stub.Watch(health_pb2.HealthCheckRequest(), timeout=timeout)
        for response in watch:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                return

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_token(token_file: str | None) -> str | None:
    """From a file (kept out of the process list and shell history), else from $GPTSERVE_AUTH_TOKEN; None for
    no token. A blank one is refused, never taken for "no token": authentication does not fail open. (An empty
    $GPTSERVE_AUTH_TOKEN counts as unset, as docker compose passes a variable nobody set.)"""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError("auth_token", f"cannot read {token_file}: "
                                            f"{getattr(error, 'strerror', None) or error}") from error
        if not token:
            raise ConfigError("auth_token", f"{token_file} is empty (or only whitespace): no token to check")
        return token
    token = os.environ.get(TOKEN_ENVIRONMENT, "")
    if token and not token.strip():
        raise ConfigError(TOKEN_ENVIRONMENT, "empty but for whitespace; set a token, or unset it for none")
    return token.strip() or None


def reply_json(*, request_id: str | None, text: str, token_ids: list[int], finish_reason: str | None,
               prompt_tokens: int, time_to_first_token_s: float, total_s: float,
               logprobs: list[float] | None = None) -> dict:
    """The one JSON shape of a finished generation, printed by both `gptserve client --json` and `gptserve generate
    --json` (request_id is None where no server named the request); logprobs only when asked for."""
    reply: dict[str, object] = {"request_id": request_id, "text": text, "token_ids": token_ids,
                                "finish_reason": finish_reason,
                                "prompt_tokens": prompt_tokens, "completion_tokens": len(token_ids),
                                "time_to_first_token_s": time_to_first_token_s, "total_s": total_s}
    if logprobs is not None:
        reply["logprobs"] = logprobs
    return reply


def print_logprobs(token_ids: Sequence[int], logprobs: Sequence[float], texts: Sequence[str]) -> None:
    """After a streamed reply, on stderr: each token's id, log-probability and text."""
    for token_id, logprob, text in zip(token_ids, logprobs, texts):
        print(f"  {token_id:>7}  {logprob:9.4f}  {text!r}", file=sys.stderr)


def connect(args) -> GenerationClient:
    try:
        root = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    except OSError as error:
        raise ConfigError("--tls-ca", f"cannot read {args.tls_ca}: {error.strerror}") from None
    return GenerationClient(args.target, token=read_token(args.token_file), root_certificates=root, tls=args.tls,
                            timeout=args.timeout)


def request_options(args) -> dict:
    options = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
        return_logprobs=args.logprobs,
    )
    if getattr(args, "parse_special_tokens", False):
        options["parse_special_tokens"] = True
    return options


def first_messages(args) -> list[dict]:
    return [{"role": "system", "content": args.system}] if args.system else []


def stream_reply(client: GenerationClient, options: dict, logprobs: bool) -> str:
    """Streams one reply to stdout as its tokens arrive, its summary (and logprobs) to stderr; returns its text."""
    last, texts, ids, values = None, [], [], []
    for last in client.stream(**options):
        for token in last.tokens:
            print(token.text, end="", flush=True)
            texts.append(token.text)
            ids.append(token.id)
            values.append(token.logprob)
    assert last is not None  # a stream that ends without an error ends with its final message
    print(flush=True)  # the reply's own line ends: a prompt or a shell's comes next
    if logprobs:
        print_logprobs(ids, values, texts)
    print(f"[{FINISH_REASON_NAMES.get(last.finish_reason)}: {last.usage.completion_tokens} tokens, "
          f"first token {last.timings.time_to_first_token_seconds * 1000:.0f} ms, "
          f"total {last.timings.total_seconds:.2f} s]", file=sys.stderr)
    return "".join(texts)


def rpc_failure(error: grpc.RpcError) -> int:
    print(f"error: {error.code().name}: {' '.join(str(error.details()).split())}", file=sys.stderr)
    return 1


def run_client(args) -> int:
    """`gptserve client`: one generation, streamed to the terminal as tokens arrive (or one JSON object)."""
    options = request_options(args)
    if args.chat or args.system:
        options["messages"] = [*first_messages(args), {"role": "user", "content": args.prompt}]
    else:
        options["prompt"] = args.prompt
    with connect(args) as client:
        try:
            if not args.json:
                stream_reply(client, options, args.logprobs)
                return 0
            response = client.generate(**options)
        except grpc.RpcError as error:
            return rpc_failure(error)
    print(json.dumps(reply_json(
        request_id=response.request_id, text=response.text, token_ids=list(response.token_ids),
        finish_reason=FINISH_REASON_NAMES.get(response.finish_reason), prompt_tokens=response.usage.prompt_tokens,
        time_to_first_token_s=response.timings.time_to_first_token_seconds, total_s=response.timings.total_seconds,
        logprobs=list(response.logprobs) if args.logprobs else None)))
    return 0


def run_chat(args) -> int:
    """`gptserve chat`: a conversation, one user turn per line of stdin, each reply streamed; the history goes with
    every turn. Ends at end of input (Ctrl-D); a failed turn ends it with status 1."""
    messages = first_messages(args)
    interactive = sys.stdin.isatty()
    with connect(args) as client:
        while True:
            if interactive:
                print(">>> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:  # end of input
                if interactive:
                    print(file=sys.stderr)
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            try:
                reply = stream_reply(client, {**request_options(args), "messages": messages}, args.logprobs)
            except grpc.RpcError as error:
                return rpc_failure(error)
            messages.append({"role": "assistant", "content": reply})
