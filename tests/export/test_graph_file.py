"""The engine's weight-free reading of an ONNX file sees what onnx.load sees."""

import onnx
import pytest

from gptserve.export.graph_file import position_limit, read_structure


@pytest.mark.parametrize("name", ["tiny_artifact", "tiny_gpt2_artifact"])
def test_structure_equals_onnx_load(name, request):
    path = request.getfixturevalue(name) / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    structure = read_structure(path)
    assert structure.initializers == {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}
    assert [(node.op_type, node.inputs) for node in structure.nodes] == [
        (node.op_type, tuple(node.input)) for node in model.graph.node]
    assert position_limit(path) == 256  # the tiny models' rotary cache / position table


def test_a_truncated_file_is_an_error(tiny_artifact, tmp_path):
    data = (tiny_artifact / "model.onnx").read_bytes()
    cut = tmp_path / "model.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated|no graph"):
        read_structure(cut)
