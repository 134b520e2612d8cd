"""PyTorch eager on CPU, inference mode."""

from __future__ import annotations

import numpy as np
import torch


class TorchRunner:
    """``run(x)`` calls the module on ``x`` under ``torch.inference_mode`` and returns numpy."""

    def __init__(self, module: torch.nn.Module, *, threads: int) -> None:
        torch.set_num_threads(threads)
        self.module = module.eval()

    def run(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(np.ascontiguousarray(x))).float().numpy()
