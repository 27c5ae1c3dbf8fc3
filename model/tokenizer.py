"""Text <-> token ids: a `tokenizers.Tokenizer` plus what the model says about BOS, EOS and its chat format.

Loads a GGUF file (byte-level BPE) or a Hugging Face folder, and saves a folder that this module, transformers and
onnxruntime-genai all read. No torch here: the server imports this module.
"""

from __future__ import annotations

import functools
import json
import mmap
import re
import secrets
import struct
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

CHAT_ROLES = ("system", "user", "assistant", "tool")

# transformers writes this for "no limit"; anything this large means the folder does not know the context length.
_UNBOUNDED_LENGTH = int(1e30)
# Texts this long are encoded through encode_batch, the one call of `tokenizers` that releases the GIL: a long
# prompt then takes a second of one thread without stopping the others (a server's event loop among them).
_LONG_TEXT = 4096


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded, or a chat its template cannot render."""


class Tokenizer:
    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ) -> None:
        # Padding or truncation stored in a tokenizer.json would silently change what encode returns.
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self._special_ids = frozenset(
            index for index, token in backend.get_added_tokens_decoder().items() if token.special
        )
        self._compiled_template: jinja2.Template | None = None
        # The same tokenizer reading special-token text as plain text. Made now, not on first use: the copy
        # holds the GIL for ~0.1 s, which a server would otherwise pay on its event loop's time.
        self._literal = Backend.from_str(backend.to_str())
        self._literal.encode_special_tokens = True
        # Characters of the longest token as the vocabulary spells it. Byte-level vocabularies spell one character
        # per byte and SentencePiece ones one per character, so no token stands for more characters of text than
        # this: a text longer than `n * longest_token_characters` is more than `n` tokens.
        self.longest_token_characters = max(map(len, backend.get_vocab(with_added_tokens=True)), default=1)

    def vocabulary(self) -> dict[str, int]:
        """Every token's spelling and id, added tokens included: two tokenizers with the same read text alike."""
        return self._backend.get_vocab(with_added_tokens=True)

    # Loading and saving ---------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The tokenizer a GGUF file describes in its `tokenizer.*` metadata."""
        metadata = read_gguf_metadata(path)
        kind = metadata.get("tokenizer.ggml.model")
        if kind is None:
            raise TokenizerError(f"{path}: no tokenizer in this GGUF file (tokenizer.ggml.model is missing)")
        if kind != "gpt2":
            raise TokenizerError(
                f"{path}: tokenizer.ggml.model is {kind!r}; supported: 'gpt2' (byte-level BPE). "
                "Use a Hugging Face folder with tokenizer.json for other tokenizers."
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if not metadata.get(key):
                raise TokenizerError(f"{path}: {key} is missing or empty")
        tokens = metadata["tokenizer.ggml.tokens"]
        token_types = metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if len(token_types) != len(tokens):
            raise TokenizerError(f"{path}: {len(tokens)} tokens but {len(token_types)} token types")

        def token_id(name: str) -> int | None:
            index = metadata.get(f"tokenizer.ggml.{name}")
            if index is not None and not 0 <= index < len(tokens):
                raise TokenizerError(f"{path}: tokenizer.ggml.{name} is {index}, outside the {len(tokens)} tokens")
            return index

        bos_token_id = token_id("bos_token_id")
        # llama.cpp stops on any end-of-generation token; end-of-turn and end-of-message are the other two.
        eos_token_ids = [index for name in ("eos_token_id", "eot_token_id", "eom_token_id")
                         if (index := token_id(name)) is not None]
        pad_token_id = token_id("padding_token_id")
        named = {index for index in (bos_token_id, pad_token_id, *eos_token_ids) if index is not None}
        backend = _byte_level_bpe(
            path, tokens, metadata["tokenizer.ggml.merges"], token_types, named,
            metadata.get("tokenizer.ggml.pre", "default"),
        )
        _set_add_bos(backend, bos_token_id, bool(metadata.get("tokenizer.ggml.add_bos_token", False)))
        architecture = metadata.get("general.architecture")
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
            chat_template=metadata.get("tokenizer.chat_template"),
            model_max_length=metadata.get(f"{architecture}.context_length"),
        )

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> Tokenizer:
        """A folder with tokenizer.json, as transformers' `save_pretrained` (or our `save`) writes it."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json (folders with only a slow tokenizer are not supported)")
        backend = Backend.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        model_configs = [_read_json(folder / "generation_config.json"), _read_json(folder / "config.json")]

        def named_id(name: str) -> int | None:
            token = config.get(name)
            token = token.get("content") if isinstance(token, dict) else token  # older files store AddedTokens
            if token is None:
                return None
            index = backend.token_to_id(token)
            if index is None:
                raise TokenizerError(f"{folder}: {name} {token!r} is not in tokenizer.json's vocabulary")
            return index

        bos_token_id = named_id("bos_token")
        if bos_token_id is None:
            bos_token_id = next(
                (found for model_config in model_configs if isinstance(found := model_config.get("bos_token_id"), int)),
                None,
            )
        # The generation config's EOS ids are the ones generate() stops on; the tokenizer's own comes first.
        eos_token_ids = [index for index in [named_id("eos_token")] if index is not None]
        for model_config in model_configs:
            value = model_config.get("eos_token_id")
            eos_token_ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
        if "add_bos_token" in config:
            _set_add_bos(backend, bos_token_id, bool(config["add_bos_token"]))
        length = config.get("model_max_length")
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_ids=eos_token_ids,
            pad_token_id=named_id("pad_token"),
            chat_template=_folder_chat_template(folder, config),
            model_max_length=int(length) if isinstance(length, (int, float)) and length < _UNBOUNDED_LENGTH else None,
        )

    # A folder written by `save` is a Hugging Face folder.
    from_folder = from_hf_folder

    def save(self, folder: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json, readable by `from_folder`, transformers and onnxruntime-genai."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "bos_token": self._token_or_none(self.bos_token_id),
            "eos_token": self._token_or_none(self.eos_token_ids[0] if self.eos_token_ids else None),
            "pad_token": self._token_or_none(self.pad_token_id),
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "chat_template": self.chat_template,
        }
        config = {key: value for key, value in config.items() if value is not None}
        _write_json(folder / "tokenizer_config.json", config)
        if len(self.eos_token_ids) > 1:
            # tokenizer_config.json holds one EOS token; the others go where transformers' generate() finds them,
            # merged into a generation config that may already be there.
            path = folder / "generation_config.json"
            _write_json(path, {**_read_json(path), "eos_token_id": self.eos_token_ids})

    # Encoding and decoding ------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, parse_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; with `add_special_tokens`, BOS first where the model asks for it. With
        `parse_special_tokens` (transformers' default, for trusted text) special-token text such as
        "<|im_end|>" becomes that control token; without, it is encoded as the plain text it is."""
        return self._encode(text, add_special_tokens, parse_special_tokens).ids

    def _encode(self, text: str, add_special_tokens: bool, parse_special_tokens: bool):
        backend = self._backend if parse_special_tokens else self._literal
        if len(text) < _LONG_TEXT:
            return backend.encode(text, add_special_tokens=add_special_tokens)
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]


    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one tokenizer per served model: it lives as long as the process)
    def token_text(self, token_id: int) -> str:
        """One token's own text, as logprobs report it (U+FFFD where it is part of a character)."""
        return self._backend.decode([token_id], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def add_bos_token(self) -> bool:
        # Read from what encode does, so the flag cannot disagree with the ids.
        return self.bos_token_id is not None and self.encode("")[:1] == [self.bos_token_id]

    @property
    def bos_token(self) -> str | None:
        return self._token_or_none(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token_or_none(self.eos_token_ids[0] if self.eos_token_ids else None)

    def backend_json(self) -> str:
        """The whole tokenizer as tokenizer.json spells it (what other libraries build their own view from)."""
        return self._backend.to_str()

    def id_to_token(self, index: int) -> str | None:
        return self._backend.id_to_token(index)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def is_special(self, index: int) -> bool:
        return index in self._special_ids

    def _token_or_none(self, index: int | None) -> str | None:
        return None if index is None else self._backend.id_to_token(index)

    # Chat -----------------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The prompt for `messages`, rendered as transformers' `apply_chat_template(..., tokenize=False)` does;
        `tools` as transformers passes them ({"type": "function", "function": {name, description, parameters}})."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template; send a plain prompt instead of messages")
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self.chat_template)
        try:
            # tools and documents are passed as None, not left undefined: templates test them with `is none`.
            return self._compiled_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools or None,
                documents=None,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as error:
            raise TokenizerError(f"chat template: {error}") from error

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> tuple[list[int], str]:
        """The prompt for `messages` and its token ids, in which control tokens come from the template only:
        special-token text inside a message's content is encoded as text, so no message can write a turn of its
        own. A chat without such text gets exactly the ids of encoding the whole prompt."""
        text, contents = self._render_with_content_spans(messages, add_generation_prompt, tools)
        encoding = self._encode(text, add_special_tokens=False, parse_special_tokens=True)
        if not any(self.is_special(index) and _overlaps(offsets, contents)
                   for index, offsets in zip(encoding.ids, encoding.offsets)):
            return encoding.ids, text
        # Cut only at the template's own special tokens and encode everything between them, content included, as
        # text: what encoding the whole prompt does between special tokens anyway.
        cuts: list[re.Match[str]] = []
        template_start = 0
        for content_start, content_end in [*contents, (len(text), len(text))]:
            cuts += self._special_pattern.finditer(text, template_start, content_start)
            template_start = content_end
        ids, position = [], 0
        for cut in cuts:
            if cut.start() > position:
                ids += self._encode(text[position:cut.start()], False, False).ids
            ids.append(self.token_to_id(cut.group()))
            position = cut.end()
        if position < len(text):
            ids += self._encode(text[position:], False, False).ids
        return ids, text

    def _render_with_content_spans(self, messages: list[dict], add_generation_prompt: bool,
                                   tools: list[dict] | None):
        """The rendered chat, and where each message's content lies in it: found by rendering the chat again
        with a unique marker in place of each content. A template that changes content (other than trimming it)
        is refused, since its prompt could not be split into the template's text and the messages'."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools)
        marker = f"\ue000{secrets.token_hex(8)}:"
        marked_messages = [{**message, "content": f"{marker}{index}\ue001"} for index, message in enumerate(messages)]
        try:
            marked = self.apply_chat_template(marked_messages, add_generation_prompt, tools)
        except TokenizerError:  # a template that inspects content may refuse the markers
            marked = ""
        pieces = re.split(f"{re.escape(marker)}(\\d+)\ue001", marked)
        # Templates such as Llama 3's trim each content; any other change is refused.
        for shape in (str, str.strip):
            rebuilt, contents, position = [], [], 0
            for number, piece in enumerate(pieces):
                if number % 2:  # the odd pieces are the captured message numbers
                    piece = shape(messages[int(piece)]["content"])
                    contents.append((position, position + len(piece)))
                rebuilt.append(piece)
                position += len(piece)
            if "".join(rebuilt) == text:
                return text, contents
        raise TokenizerError("the chat template rewrites message content, so the content cannot be kept apart "
                             "from the template's control tokens; send a plain prompt instead")

    @functools.cached_property
    def _special_pattern(self) -> re.Pattern:
        """Matches any special token's text, the longest first (as the tokenizer's own matcher does)."""
        # Each special id is one of the backend's added tokens, so each has its text.
        tokens = (self._backend.id_to_token(index) for index in self._special_ids)
        texts = sorted((token for token in tokens if token is not None), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, texts)) or "(?!)")


def _overlaps(span: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    start, end = span
    return any(start < other_end and other_start < end for other_start, other_end in spans)


# Building a byte-level BPE tokenizer from GGUF metadata -------------------------------------------------------

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp's token types

# The regex that splits text before BPE, by `tokenizer.ggml.pre`; None is GPT-2's own, built into ByteLevel.
# "smollm" is what transformers' GGUF converter does: it has no entry for it and falls back to GPT-2's regex.
# (llama.cpp isolates each digit first; the two differ on runs of whitespace before a digit, as in "a\n\n1".)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


def _byte_level_bpe(
    path: str | Path,
    tokens: list[str],
    merges: list[str],
    token_types: list[int],
    named: set[int],
    pre: str,
) -> Backend:
    if pre not in _PRE_TOKENIZER_SPLITS:
        raise TokenizerError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not supported; supported: {sorted(_PRE_TOKENIZER_SPLITS)}"
        )
    # Byte-level vocabularies spell every byte as one printable character; a token spelled in plain text
    # is respelled that way, since that is the only spelling BPE can produce.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {
        token if set(token) <= alphabet else spell.pre_tokenize_str(token)[0][0]: index
        for index, token in enumerate(tokens)
    }
    try:
        pairs = [tuple(merge.split(" ")) for merge in merges]
        backend = Backend(models.BPE(vocab=vocab, merges=pairs))  # type: ignore[arg-type]  # BPE checks each is a pair
    except Exception as error:  # tokenizers raises plain Exception on a merge naming an unknown token
        raise TokenizerError(f"{path}: tokenizer.ggml.merges do not fit the vocabulary: {error}") from error

    split = _PRE_TOKENIZER_SPLITS[pre]
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()

    # Control tokens (and BOS/EOS/pad) are matched whole in the text and skippable on decode; user-defined ones
    # are matched whole but are ordinary text. A control token spelled outside the byte alphabet is a mislabel
    # (adding it would grow the vocabulary past the model's), so it stays a plain token.
    special = [index for index, kind in enumerate(token_types) if kind == _CONTROL or index in named]
    backend.add_special_tokens([
        AddedToken(tokens[index], special=True, normalized=False)
        for index in special if set(tokens[index]) <= alphabet
    ])
    backend.add_tokens([
        AddedToken(tokens[index], special=False, normalized=False)
        for index, kind in enumerate(token_types) if kind == _USER_DEFINED and set(tokens[index]) <= alphabet
    ])
    return backend


def _set_add_bos(backend: Backend, bos_token_id: int | None, add_bos: bool) -> None:
    """Make the backend's own post-processor add BOS or not, so tokenizer.json alone encodes correctly."""
    bos = None if bos_token_id is None else backend.id_to_token(bos_token_id)
    adds_bos = bos_token_id is not None and backend.encode("").ids[:1] == [bos_token_id]
    if add_bos and bos is None:
        raise TokenizerError("add_bos_token is set but the tokenizer has no BOS token")
    if adds_bos == add_bos:  # leave a post-processor that already does the right thing untouched
        return
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_token_id)]
        )
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")


# Chat templates -----------------------------------------------------------------------------------------------


def _compile_chat_template(source: str) -> jinja2.Template:
    # Templates come from model files, so they run sandboxed; the helpers are the ones transformers provides.
    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(source)
    except jinja2.TemplateError as error:
        raise TokenizerError(f"chat template does not compile: {error}") from error


def _folder_chat_template(folder: Path, config: dict) -> str | None:
    # Newer transformers write the template to its own file, older ones into tokenizer_config.json,
    # sometimes as a list of named templates.
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    return template


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TokenizerError(f"{path}: not valid JSON: {error}") from error


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# Reading GGUF metadata ----------------------------------------------------------------------------------------

# GGUF value types: struct formats of the fixed-size ones; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key-value header of a GGUF file (arrays as lists). The tensors are not read, so this is fast."""
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                raise TokenizerError(f"{path}: not a GGUF file (starts with {bytes(data[:4])!r})")
            reader = _GGUFReader(data)
            version = reader.scalar("I")
            if version not in (2, 3):
                raise TokenizerError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            reader.scalar("Q")  # tensor count
            return {reader.string(): reader.value(reader.scalar("I")) for _ in range(reader.scalar("Q"))}
    except TokenizerError:
        raise
    except (struct.error, ValueError) as error:  # ValueError covers bad UTF-8 and an empty file
        raise TokenizerError(f"{path}: truncated or corrupt GGUF metadata ({error})") from error


class _GGUFReader:
    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.offset = 4

    def scalar(self, layout: str):
        (value,) = struct.unpack_from("<" + layout, self.data, self.offset)
        self.offset += struct.calcsize(layout)
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        raw = self.data[self.offset : self.offset + length]
        if len(raw) != length:
            raise struct.error("string runs past the end of the file")
        self.offset += length
        return raw.decode("utf-8")

    def value(self, kind: int):
        if kind in _GGUF_SCALARS:
            return self.scalar(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return self.string()
        if kind == _GGUF_ARRAY:
            item_kind, count = self.scalar("I"), self.scalar("Q")
            if item_kind in _GGUF_SCALARS:  # one unpack for the whole array
                layout = f"<{count}{_GGUF_SCALARS[item_kind]}"
                values = list(struct.unpack_from(layout, self.data, self.offset))
                self.offset += struct.calcsize(layout)
                return values
            return [self.value(item_kind) for _ in range(count)]
        raise TokenizerError(f"unknown GGUF value type {kind}")
