"""The demo: a small CNN trained on scikit-learn's 8x8 handwritten digits, then compressed with
structured channel pruning, recovery fine-tuning with distillation, and INT8 quantization."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shrinkml.data import ArrayData, Splits, load_data
from shrinkml.progress import Progress

DEMO_RECIPE = {
    "steps": [
        {"technique": "prune.channels", "channel_ratio": 0.5, "importance": "l2"},
        # fixed-length recovery: on ~1,000 examples a 10% early-stopping holdout is too noisy to help
        {
            "technique": "finetune",
            "epochs": 40,
            "lr": 3e-3,
            "distill": True,
            "alpha": 0.5,
            "validation_fraction": 0.0,
            "patience": None,
        },
        {"technique": "quantize.dynamic"},
    ]
}


def digits_cnn(width: int = 32, hidden: int = 128, num_classes: int = 10) -> nn.Module:
    """LeNet-style CNN for 1x8x8 digits: two Conv-BN-ReLU blocks, a max-pool, and an MLP head."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def digits_mlp(hidden: tuple[int, ...] = (256, 128), num_classes: int = 10) -> nn.Module:
    """MLP for 1x8x8 digits: flatten the 64 pixels, Linear-ReLU blocks of ``hidden`` widths, logits."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 64
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def train_classifier(
    model: nn.Module, data: ArrayData, *, epochs: int, lr: float, seed: int, progress: Progress, batch_size: int = 64
) -> nn.Module:
    """Plain supervised training (Adam, cosine schedule); used to make the demo's FP32 model."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    with progress.bar("train FP32 demo model", total=steps) as bar:
        for epoch in range(epochs):
            order = torch.from_numpy(rng.permutation(len(x)))
            for i in range(len(x) // batch_size):
                b = order[i * batch_size : (i + 1) * batch_size]
                loss = loss_fn(model(x[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.advance(1, status=f"epoch {epoch + 1} loss {float(loss.detach()):.3f}")
    return model.eval()


def demo_data(seed: int = 0) -> Splits:
    """Digits split into calibration 10% / fine-tune (also the FP32 training set) 50% / validation 10% /
    test 30%."""
    return load_data("builtin:digits", seed=seed)


def build_demo_model(
    splits: Splits,
    *,
    seed: int,
    progress: Progress,
    weights_out: Path | None = None,
    factory: Callable[[], nn.Module] = digits_cnn,
) -> nn.Module:
    """Train ``factory()`` (the demo CNN by default, or ``digits_mlp``) on the fine-tune split; with
    ``weights_out``, save its weights there for ``--model shrinkml.examples.demo:<factory>``."""
    torch.manual_seed(seed)
    model = train_classifier(factory(), splits.finetune, epochs=20, lr=3e-3, seed=seed, progress=progress)
    if weights_out is not None:
        from shrinkml.models.safetensors_io import save_state_dict

        save_state_dict(model.state_dict(), weights_out)
    return model
