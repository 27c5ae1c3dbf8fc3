"""Tool calls on the chat API, in the form Qwen2.5, Qwen3 and Hermes templates teach their models:
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks. The grammar that forces such calls (for
tool_choice `required` or a named function), and the parser that turns a reply's text into OpenAI's tool_calls."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from gptserve.model.guidance import JSON_LAYOUT

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str

    def to_json(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def writes_tool_calls(template: str | None) -> bool:
    """Whether a chat template teaches the form this module parses."""
    return template is not None and OPEN in template


def call_grammar(tools: dict[str, dict | None], parallel: bool) -> str:
    """A Lark grammar (llguidance's, with JSON schemas inline) of one or more calls of these tools
    ({name: parameters schema}), each call's arguments valid against its function's schema."""
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": parameters or
                                                        {"type": "object"}},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for name, parameters in tools.items()], "x-guidance": JSON_LAYOUT}
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return f'{start}\ncall: {json.dumps(OPEN + chr(10))} %json {json.dumps(call)} {json.dumps(chr(10) + CLOSE)}\n'


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """The reply's content (text outside the calls; None when empty) and its calls. Text whose blocks are not all
    well-formed calls of known tools is content, whole, as the model wrote it."""
    calls = []
    for block in BLOCK.finditer(text):
        try:
            call = json.loads(block.group(1))
        except json.JSONDecodeError:
            return text, []
        if not (isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments", {}), dict)):
            return text, []
        calls.append(ToolCall(call["name"], json.dumps(call.get("arguments", {}), ensure_ascii=False),
                              f"call_{uuid.uuid4().hex[:24]}"))
    content = BLOCK.sub("", text).strip() if calls else text
    return content or None, calls


class ToolCallStream:
    """A streamed reply's content released as it comes, up to the first tool call; from there on the text is held
    and parsed once the reply ends."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self._pending = ""  # the end of the text so far, while it may begin OPEN
        self._held: str | None = None  # from the first OPEN on

    def feed(self, text: str) -> str:
        """The content safe to send now."""
        if self._held is not None:
            self._held += text
            return ""
        buffer = self._pending + text
        if (at := buffer.find(OPEN)) >= 0:
            self._held, self._pending = buffer[at:], ""
            return buffer[:at]
        keep = max((size for size in range(1, len(OPEN)) if buffer.endswith(OPEN[:size])), default=0)
        self._pending = buffer[len(buffer) - keep:]
        return buffer[: len(buffer) - keep]

    def finish(self) -> tuple[str | None, list[ToolCall]]:
        """The rest of the content, and the calls."""
        if self._held is None:
            return self._pending or None, []
        content, calls = parse_tool_calls(self._held, self.names)
        return (content, calls) if calls else (self._held, [])
