"""Channel pruning on a ResNet-18-shaped CNN: MACs, parameters and CPU latency, before and after.

Builds ResNet-18 (random, seeded weights: latency and MACs do not depend on the values), prunes it
with shrinkml's ``prune.channels`` step, and measures both models in the same process, interleaved:
PyTorch eager and ONNX Runtime, threads pinned, warm-up discarded, median and p95.

    python3 benchmarks/prune_resnet.py                      # batch 8, 224x224, 2 threads
    python3 benchmarks/prune_resnet.py --batch 1 --threads 4 --repeats 30

Writes benchmarks/out/prune_resnet.json and the ``prune_resnet`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from shrinkml.atomic import write_text  # noqa: E402
from shrinkml.data.arrays import ArrayData, Splits  # noqa: E402
from shrinkml.measure.latency import time_interleaved  # noqa: E402
from shrinkml.measure.macs import torch_macs  # noqa: E402
from shrinkml.progress import SILENT  # noqa: E402
from shrinkml.techniques import prune_channels  # noqa: E402
from shrinkml.techniques.base import ModelState, StepContext  # noqa: E402
from common import update_docs  # benchmarks/common.py (scripts run from benchmarks/)



# --- ResNet-18 (torchvision's layout, written here: torchvision is not a dependency) -------------


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, in_ch = [], 64
        for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(nn.Sequential(BasicBlock(in_ch, width, stride), BasicBlock(width, width, 1)))
            in_ch = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                # random BN scales so that channel importances differ, as in a trained network
                nn.init.uniform_(m.weight, 0.2, 1.0)
                nn.init.normal_(m.bias, 0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- measurement ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.machine()


def export_onnx(model: nn.Module, image_size: int, path: Path) -> Path:
    example = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=17,
            input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def pick_repeats(fns: dict, requested: int | None, budget_s: float) -> tuple[int, float]:
    """Rounds that fit ``budget_s`` (at least 10, at most 200) unless the user asked for a number."""
    for fn in fns.values():  # the first call pays one-time costs (kernel selection, allocation)
        fn()
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    round_s = time.perf_counter() - start
    if requested is not None:
        return max(requested, 10), round_s
    return int(min(200, max(10, budget_s / round_s - 4))), round_s  # warm-up rounds come first


def prune(model: nn.Module, channel_ratio: float, image_size: int, seed: int, threads: int) -> tuple[nn.Module, dict]:
    rng = np.random.default_rng(seed)
    data = ArrayData(rng.standard_normal((4, 3, image_size, image_size)).astype(np.float32), np.zeros(4, np.int64))
    with tempfile.TemporaryDirectory() as workdir:
        ctx = StepContext(
            splits=Splits(data, data, data, source="random", seed=seed), task=None, teacher=None,
            example_input=data.x[:2], seed=seed, threads=threads, progress=SILENT, workdir=Path(workdir),
        )
        config = prune_channels.PruneChannelsConfig(channel_ratio=channel_ratio)
        result = prune_channels.apply(ModelState("torch", model), config, ctx)
    return result.state.torch_model, result.summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="batch size of the timed forward passes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (>= 10); default: fit --budget-s")
    parser.add_argument("--budget-s", type=float, default=40.0, help="time for each runtime's timed rounds")
    parser.add_argument("--channel-ratio", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "prune_resnet.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 10:
        parser.error("--repeats must be at least 10 (median and p95 need them)")

    import onnxruntime as ort
    import torch_pruning as tp

    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    original = ResNet18().eval()
    t0 = time.perf_counter()
    pruned, summary = prune(original, args.channel_ratio, args.image_size, args.seed, args.threads)
    prune_s = time.perf_counter() - t0
    pruned.eval()

    one = torch.zeros(1, 3, args.image_size, args.image_size)
    macs = {"original": torch_macs(original, one), "pruned": torch_macs(pruned, one)}
    params = {"original": summary["params_before"], "pruned": summary["params_after"]}
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))

    def eager(model: nn.Module):
        def run():
            with torch.inference_mode():
                return model(x)

        return run

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: export_onnx(m, args.image_size, Path(tmp) / f"{name}.onnx") for name, m in
                 [("original", original), ("pruned", pruned)]}
        onnx_bytes = {name: p.stat().st_size for name, p in paths.items()}
        sessions = {name: ort_session(p, args.threads) for name, p in paths.items()}
        feeds = {"x": x.numpy()}
        # the exported graph computes what the module computes
        with torch.inference_mode():
            reference = pruned(x).numpy()
        ort_max_abs_diff = float(np.abs(sessions["pruned"].run(None, feeds)[0] - reference).max())

        runtimes = {
            "pytorch": {name: eager(m) for name, m in [("original", original), ("pruned", pruned)]},
            "onnxruntime": {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()},
        }
        for runtime, fns in runtimes.items():
            repeats, round_s = pick_repeats(fns, args.repeats, args.budget_s)
            print(f"[{runtime}] one round (original + pruned) {round_s:.2f} s -> {repeats} timed rounds", flush=True)
            stats = time_interleaved(fns, warmup=3, repeats=repeats)
            results[runtime] = {
                "latency_ms": {name: s.to_dict() for name, s in stats.items()},
                "speedup_p50": stats["original"].p50_ms / stats["pruned"].p50_ms,
            }
    del sessions

    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python3 benchmarks/prune_resnet.py", *map(shlex.quote, given)])
    report = {
        "benchmark": "prune_resnet",
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "threads": args.threads},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": ort.__version__, "torch_pruning": tp.__version__},
        "settings": {"batch": args.batch, "image_size": args.image_size, "channel_ratio": args.channel_ratio,
                     "importance": "l2", "seed": args.seed, "warmup": 3},
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "prune_seconds": prune_s,
        "step_summary": summary,
        "macs_per_image": macs,
        "macs_ratio": macs["original"] / macs["pruned"],
        "params": params,
        "params_ratio": params["original"] / params["pruned"],
        "onnx_bytes": onnx_bytes,
        "ort_vs_torch_max_abs_diff": ort_max_abs_diff,
        "runtimes": results,
    }
    write_text(args.out, json.dumps(report, indent=2) + "\n")

    rows = [
        ("MACs / image", f"{macs['original'] / 1e9:.3f} G", f"{macs['pruned'] / 1e9:.3f} G",
         f"{report['macs_ratio']:.2f}x fewer"),
        ("parameters", f"{params['original'] / 1e6:.2f} M", f"{params['pruned'] / 1e6:.2f} M",
         f"{report['params_ratio']:.2f}x fewer"),
        ("ONNX file", f"{onnx_bytes['original'] / 2**20:.1f} MiB", f"{onnx_bytes['pruned'] / 2**20:.1f} MiB",
         f"{onnx_bytes['original'] / onnx_bytes['pruned']:.2f}x smaller"),
    ]
    for runtime, r in results.items():
        lat = r["latency_ms"]
        for q in ("p50", "p95"):
            rows.append((f"{runtime} batch {args.batch} {q}", f"{lat['original'][q]:.1f} ms",
                         f"{lat['pruned'][q]:.1f} ms", f"{lat['original'][q] / lat['pruned'][q]:.2f}x faster"))
    table = "| | original | pruned | ratio |\n|---|---:|---:|---:|\n" + "\n".join(f"| {' | '.join(r)} |" for r in rows)
    print(table)

    runs = ", ".join(f"{rt}: {r['latency_ms']['original']['runs']} runs" for rt, r in results.items())
    load = report["load_average_1min"]
    section = f"""## Channel pruning, ResNet-18 (`prune.channels`, channel_ratio {args.channel_ratio})

- Command: `{report['command']}`
- Machine: {report['machine']['cpu']}, {os.cpu_count()} logical cores, {args.threads} threads pinned
  (torch and ONNX Runtime intra-op); 1-minute load average {load['start']:.1f} before, {load['end']:.1f} after
  (other work on the machine widens p95, the interleaved p50 ratios are the figures to read).
- Versions: torch {torch.__version__}, onnxruntime {ort.__version__}, torch-pruning {tp.__version__},
  Python {platform.python_version()}. Date: {report['date']}.
- Model: ResNet-18 layout with random seeded weights (speed and size do not depend on the values;
  accuracy is not measured here), input {args.batch}x3x{args.image_size}x{args.image_size}; L2 group importance;
  the output layer (fc) keeps its 1000 classes.
- Latency: 3 warm-up calls discarded; original and pruned interleaved in one process
  ({runs}); median (p50) and p95 per batch.

{table}

Channel ratio {args.channel_ratio} removes {1 - summary['channels_after'] / summary['channels_before']:.0%} of the
conv output channels but {summary['param_reduction']:.0%} of the parameters, since consecutive layers both
lose channels.
"""
    if not args.no_docs:
        update_docs(args.docs, "prune_resnet", section)
    return report


if __name__ == "__main__":
    main()
