"""The few facts the engine checks in an ONNX file, read without its weights: the protobuf fields are walked
with seeks and small reads, and tensor bytes are skipped, never read. (onnx.load of the default model's 540 MB
file took 0.5 s and raised a server's peak memory by 0.3 to 0.9 GB; this takes milliseconds, and a memory map
would still have counted ~0.2 GB of touched pages.) Torch-free."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# Field numbers of onnx.proto: ModelProto.graph; GraphProto.node, .initializer; NodeProto.input, .op_type;
# TensorProto.dims, .name.
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER = 1, 5
NODE_INPUT, NODE_OP_TYPE = 1, 4
TENSOR_DIMS, TENSOR_NAME = 1, 8


@dataclass(frozen=True)
class Node:
    op_type: str
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class GraphStructure:
    nodes: tuple[Node, ...]
    initializers: dict[str, tuple[int, ...]]  # name -> shape


def read_structure(path: str | Path) -> GraphStructure:
    """The graph's nodes (in file order) and its initializers' shapes."""
    with open(path, "rb") as handle:
        data = _File(handle)
        graphs = [value for number, value in _fields(data, 0, len(data)) if number == MODEL_GRAPH]
        if len(graphs) != 1:
            raise ValueError(f"{path}: not an ONNX model (no graph)")
        nodes, initializers = [], {}
        for number, value in _fields(data, *_span(graphs[0])):
            start, end = _span(value)  # every field of a GraphProto is length-delimited
            if number == GRAPH_NODE:
                node = data[start:end]  # small: read whole
                fields = list(_fields(node, 0, len(node)))
                op_type = next((_text(node, value) for field, value in fields if field == NODE_OP_TYPE), "")
                nodes.append(Node(op_type, tuple(_text(node, value) for field, value in fields if field == NODE_INPUT)))
            elif number == GRAPH_INITIALIZER:  # walked in the file: its raw data is skipped
                name, dims = "", []
                for field, value in _fields(data, start, end):
                    if field == TENSOR_NAME:
                        name = _text(data, value)
                    elif field == TENSOR_DIMS:
                        dims += [value] if isinstance(value, int) else _packed(data[value[0]:value[1]])
                initializers[name] = tuple(dims)
        return GraphStructure(tuple(nodes), initializers)


class _File:
    """A file read as bytes by slices (a seek and a read each), never whole."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.size = handle, os.fstat(handle.fileno()).st_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, span: slice) -> bytes:
        self.handle.seek(span.start)
        return self.handle.read(span.stop - span.start)


def position_limit(path: str | Path) -> int:
    """How many positions the graph itself can embed: the rows of GroupQueryAttention's rotary cos cache, or of
    the learned position table (an initializer gathered by anything but the token ids; export/fused.py). A longer
    sequence fails inside ONNX Runtime, so this, not the manifest's word, bounds the context."""
    structure = read_structure(path)
    rotary = [node.inputs[7] for node in structure.nodes
              if node.op_type == "GroupQueryAttention" and len(node.inputs) > 7 and node.inputs[7]]
    learned = [node.inputs[0] for node in structure.nodes if node.op_type == "Gather" and node.inputs[1] != "input_ids"]
    for name in (*rotary, *learned):
        shape = structure.initializers.get(name)
        if shape is not None and len(shape) == 2:
            return shape[0]
    raise ValueError(f"{path}: no rotary cache or position table found in the graph")


Bytes = bytes | _File


def _varint(data: Bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    for byte in data[offset:offset + 10]:  # a varint is at most 10 bytes
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, offset
    raise ValueError(f"a truncated or overlong protobuf varint at byte {offset}")


def _fields(data: Bytes, start: int, end: int) -> Iterator[tuple[int, int | tuple[int, int]]]:
    """(field number, value) of one message: a varint's value, or a length-delimited field's (start, end)."""
    value: int | tuple[int, int]
    while start < end:
        key, start = _varint(data, start)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, start = _varint(data, start)
        elif wire_type == 2:
            length, start = _varint(data, start)
            value, start = (start, start + length), start + length
        elif wire_type in (1, 5):  # fixed 64 and 32 bits: nothing read here needs them
            value, start = 0, start + (8 if wire_type == 1 else 4)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type} at byte {start}")
        if start > end:
            raise ValueError("a protobuf field runs past its message: truncated file")
        yield number, value


def _span(value: int | tuple[int, int]) -> tuple[int, int]:
    # onnx.proto's strings and messages are length-delimited: a varint there is a corrupt file (a ValueError,
    # which the engine reports as an unusable artifact).
    if not isinstance(value, tuple):
        raise ValueError("a number where onnx.proto has a string or a message: the graph file is corrupt")
    return value


def _text(data: Bytes, value: int | tuple[int, int]) -> str:
    start, end = _span(value)
    return data[start:end].decode("utf-8")


def _packed(data: bytes) -> list[int]:
    values, offset = [], 0
    while offset < len(data):
        value, offset = _varint(data, offset)
        values.append(value)
    return values
