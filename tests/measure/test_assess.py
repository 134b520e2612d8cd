"""What ``agreement_with_baseline`` measures, per task, on known outputs."""

from __future__ import annotations

import numpy as np
import pytest

from shrinkml.measure.assess import agreement_with_baseline
from shrinkml.tasks import get_task


def test_embeddings_agree_by_cosine_not_by_arg_max_dimension():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((200, 16))
    # Small noise: every embedding points the same way, yet its largest dimension often changes,
    # which an arg-max "top-1 agreement" (the old 0.922 for embeddings) would count as disagreement.
    outputs = reference + 0.05 * rng.standard_normal((200, 16))
    entry = agreement_with_baseline(get_task("embedding"), outputs, reference, seed=0, resamples=300)
    assert entry["metric"] == "cosine_similarity"
    cosines = (outputs * reference).sum(1) / np.linalg.norm(outputs, axis=1) / np.linalg.norm(reference, axis=1)
    assert entry["value"] == pytest.approx(cosines.mean())
    assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1] < 1.0


@pytest.mark.parametrize("task", ["classification", "fidelity"])
def test_class_scores_agree_by_top1(task):
    reference = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [1.0, 2.0]])
    outputs = np.array([[3.0, 1.0], [1.0, 0.0], [4.0, 1.0], [0.0, 2.0]])  # the second example flips
    entry = agreement_with_baseline(get_task(task), outputs, reference, seed=0, resamples=300)
    assert entry["metric"] == "top1_agreement" and entry["value"] == pytest.approx(0.75)
