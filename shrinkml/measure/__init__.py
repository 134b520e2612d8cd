"""What shrinkml measures: statistics, parameters, MACs, latency, peak memory.

Import the submodule you need (``from shrinkml.measure.latency import time_interleaved``). This
package imports nothing itself, so that ``import shrinkml.measure`` stays cheap and never pulls in
torch, onnx or onnxruntime as a side effect.
"""

__all__ = ["latency", "macs", "memory", "params", "stats"]
