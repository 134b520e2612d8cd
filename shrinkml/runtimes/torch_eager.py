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
            out = self.module(torch.from_numpy(np.ascontiguousarray(x)))
            if hasattr(out, "logits"):  # a Hugging Face model output (a causal LM's): its logits
                out = out.logits
            return out.float().numpy()


class TorchEager:
    """PyTorch eager on CPU: measures the ``.safetensors`` state dict of a PyTorch model state."""

    name = "torch"
    accepts = frozenset({"torch"})
    causal_lm_only = False
    artifact_suffix = ".safetensors"
    artifact_format = "safetensors"

    def prepare(self, state, label, *, example, workdir, threads, export_tolerance, opset=17):
        from shrinkml.artifacts import torch_artifact

        return torch_artifact(state, label, example=example, workdir=workdir)

    def runner(self, artifact, *, threads: int) -> TorchRunner:
        return TorchRunner(artifact.module, threads=threads)

    def peak_memory(self, artifact, batch, *, threads: int, workdir) -> int:
        import sys

        from shrinkml.measure import memory

        module_file = workdir / f"{artifact.label}.module.pt"
        memory.save_module_for_child(artifact.module, module_file)
        return memory.peak_memory_torch(module_file, {"input": batch}, threads=threads, sys_path=list(sys.path))

    def load_instruction(self, file_name: str) -> str:
        return (f"shrinkml.models.safetensors_io.load_state_dict({file_name!r}) into the factory's model"
                " after fit_module_to_state_dict")

    def check_installed(self) -> None:
        """PyTorch is what shrinkml's causal-LM loading needs anyway."""

    def check_lm(self, loaded) -> None:
        """PyTorch measures every causal LM shrinkml loads."""

    def lm_generator(self, *, loaded=None, gguf_path=None, threads: int, context: int, new_tokens: int):
        """The input model as loaded, or a written GGUF loaded back on its own (what a user reads)."""
        from shrinkml.measure.lm import TorchGenerator

        if gguf_path is not None:
            from shrinkml.models.causal_lm import load_gguf

            loaded = load_gguf(gguf_path)
        return TorchGenerator(loaded.module, threads=threads)

    def describe(self, runner: TorchRunner) -> dict:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in runner.module.parameters()})
        out = {"version": torch.__version__, "device": "CPU", "mode": "eager, inference_mode",
               "parameter_dtypes": dtypes, "threads": torch.get_num_threads()}
        if "bfloat16" in dtypes:
            from shrinkml.nn.int8 import prepack_available

            out["bfloat16_linear_kernel"] = ("oneDNN, weights prepacked once (SHRINKML_NO_PREPACK=1: F.linear)"
                                             if prepack_available() else "F.linear (oneDNN reorders each call)")
        if getattr(runner.module, "unpad", False):
            out["unpad"] = "real tokens only (shrinkml.nn.unpad)"
        return out


RUNTIME = TorchEager()
