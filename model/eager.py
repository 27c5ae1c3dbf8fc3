"""The eager PyTorch model as a generation step function (numpy in, numpy out), the reference path."""

from __future__ import annotations

import numpy as np
import torch

from gptserve.model.gpt import GPT, PastKeyValues


class EagerStep:
    """Each row's last position's logits. The model appends each step at the end of every row, so rows must be
    of equal length (or left-padded); the ONNX engine's ragged rows (service/engine.py) are not this layout."""

    def __init__(self, model: GPT) -> None:
        self.model = model.eval()

    @torch.inference_mode()
    def __call__(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: PastKeyValues | None
    ) -> tuple[np.ndarray, PastKeyValues]:
        logits, present = self.model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask), past)
        return logits[:, -1].numpy(), present  # (B, V)
