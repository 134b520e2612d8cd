"""The common conformance suite: every registered technique, checked the same way.

In the spirit of scikit-learn's ``check_estimator``: the cases come from
``shrinkml.techniques.base.registry()``, so a new technique is checked here without a line of test.
Each technique runs with its default config (``CONFIG_OVERRIDES`` only where a default needs a
required field or is too slow for a test) once for every model kind it declares in ``accepts`` and
every model family it fits (a tiny CNN, a tiny BERT, a tiny Llama), and again for every config
field that can be set to ``"auto"`` (a step that searches on data) and every ``DATA_VARIANTS``
entry (a config whose path reads data the default's does not). Every run must:

1. leave its inputs as they were: the model state, the teacher, the example input and the splits;
2. never touch the test split (it is a recorder here that notes every use);
3. return a summary the report can write as strict JSON;
4. have a config that survives a YAML round trip (``Recipe.to_yaml`` / ``Recipe.from_yaml``);
5. take every kind it declares and produce the kind it declares (``produces``; None = same kind);
6. produce a model its declared runtime runs (``runtime``; None = every runtime for its kind:
   ONNX Runtime and PyTorch for a PyTorch model, ONNX Runtime for an ONNX graph), built into the
   artifact the pipeline would deploy;
7. be deterministic for a seed: the same output (within 1e-6; ONNX graphs byte for byte) from a
   second run on a copy of the input, whatever the global random generators hold.

The only per-technique knowledge is which model family fits (``NEEDS_TEXT_ENCODER``,
``NOT_FOR_TEXT_ENCODER``, ``NEEDS_CAUSAL_LM``: a tiny Llama), ``CONFIG_OVERRIDES`` and ``DATA_VARIANTS``. A failing case is a bug in the technique: fix
it there (this suite found quantize.half and quantize.qat casting token ids to float32).
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

from shrinkml.budget import Budget
from shrinkml.data.arrays import ArrayData, Splits, make_splits
from shrinkml.progress import SILENT
from shrinkml.recipe import Recipe
from shrinkml.report.json_report import to_jsonable
from shrinkml.tasks import get_task
from shrinkml.techniques.base import ModelState, StepConfig, StepContext, StepResult, Technique, registry
from tests.conftest import tiny_cnn, toy_data

TECHNIQUES: dict[str, Technique] = registry()
SEED = 0
THREADS = 1
ATOL = 1e-6

# --- what model fits a technique -----------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """A model family with data it takes: ``build()`` makes the (seeded) model, ``data()`` its data."""

    name: str
    build: Callable[[], nn.Module]
    data: Callable[[], ArrayData]
    task: str


VOCAB = 300  # rows of the word embedding table: more than share.embeddings' default min_rows (256)


def tiny_text_encoder() -> nn.Module:
    """A random two-layer BERT (hidden 48: a multiple of share.embeddings' default vector_size 3)
    wrapped like a loaded sentence encoder."""
    import transformers

    from shrinkml.models.text import TextEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32,
    )
    return TextEncoder(transformers.BertModel(config)).eval()


def token_ids(n: int = 120, seq: int = 10) -> ArrayData:
    """Padded token-id rows (pad id 0), no labels, as text data is tokenized."""
    rng = np.random.default_rng(0)
    x = rng.integers(1, VOCAB, (n, seq)).astype(np.int64)
    for row, length in zip(x, rng.integers(3, seq + 1, n)):
        row[length:] = 0
    return ArrayData(x)


def tiny_causal_lm() -> nn.Module:
    """A random two-layer Llama with tied embeddings (hidden 64: whole 32-weight blocks, no 256-weight
    K-quant super-block, so K-quant formats take llama.cpp's fallback)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.3,
    )
    return transformers.LlamaForCausalLM(config).eval()


def token_windows(n: int = 60, seq: int = 16) -> ArrayData:
    """Token-id windows with their first scored position, as shrinkml.data.lm cuts text."""
    rng = np.random.default_rng(0)
    return ArrayData(rng.integers(0, 64, (n, seq)).astype(np.int64), np.ones(n, np.int64))


VISION = Subject("cnn", tiny_cnn, lambda: toy_data(200), "classification")
TEXT = Subject("bert", tiny_text_encoder, token_ids, "embedding")
LLAMA = Subject("llama", tiny_causal_lm, token_windows, "perplexity")

# No technique declares what model it needs, so this is the one place that says it. A technique
# runs on the tiny CNN (Conv, BatchNorm, Linear; float inputs) and on the tiny text encoder
# (Embedding, attention, LayerNorm; int64 token ids with padding), except:
NEEDS_TEXT_ENCODER = frozenset({  # they cut or rewrite parts only a BERT-like text encoder has
    "prune.heads", "prune.ffn", "prune.layers",  # a Hugging Face encoder's heads, FFN neurons, layers
    "share.embeddings",  # embedding tables (Gather) with at least min_rows rows
    "unpad",  # a BERT encoder's forward on real tokens only
})
NOT_FOR_TEXT_ENCODER = frozenset({  # documented for CNNs and MLPs; transformers have their own steps
    "prune.channels",  # cutting a BERT's hidden channels breaks its head layout: prune.heads / prune.ffn
})
NEEDS_CAUSAL_LM = frozenset({  # decoder language models only (and no other technique takes one yet)
    "quantize.gguf",  # llama.cpp block formats for a *ForCausalLM's weights
})

# Only where a default cannot run or runs too long for a test.
CONFIG_OVERRIDES: dict[str, dict[str, Any]] = {
    "finetune": {"epochs": 1},
    "quantize.qat": {"epochs": 1},
    "prune.layers": {"keep": 1},  # required: keep or keep_layers
}


# Variants whose path reads data where the default's does not (calibration statistics, measured
# sensitivities): run on the technique's first family, like the "auto" variants, by name.
DATA_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "quantize.bf16": {"gptq": {"method": "gptq"}},
    "quantize.gguf": {
        "imatrix-budget": {"method": "imatrix", "bits_per_weight": 5.0, "calibration_windows": 2, "sensitivity_windows": 1},
        "gptq-promote": {"method": "gptq", "promote": 2, "calibration_windows": 2, "sensitivity_windows": 1},
    },
}


def subjects_for(name: str) -> tuple[Subject, ...]:
    if name in NEEDS_CAUSAL_LM:
        return (LLAMA,)
    if name in NEEDS_TEXT_ENCODER:
        return (TEXT,)
    if name in NOT_FOR_TEXT_ENCODER:
        return (VISION,)
    return (VISION, TEXT)


SUBJECTS = {s.name: s for s in (VISION, TEXT, LLAMA)}


def default_config(name: str) -> StepConfig:
    return TECHNIQUES[name].config_cls(**CONFIG_OVERRIDES.get(name, {}))


def search_fields(name: str) -> list[str]:
    """Config fields that take ``"auto"`` where the default does not: the step then chooses by
    measuring on data (e.g. ``keep_float: auto``), the path most likely to reach for held-out data."""
    default = default_config(name)
    found = []
    for key in TECHNIQUES[name].config_cls.model_fields:
        try:
            config = default.model_validate({**default.model_dump(), key: "auto"})
        except ValidationError:
            continue
        if config != default:
            found.append(key)
    return found


@dataclass(frozen=True)
class Case:
    technique: str
    kind: str  # the kind of the input model
    subject: str  # the model family (SUBJECTS)
    auto: str | None = None  # a config field set to "auto"
    variant: str | None = None  # a DATA_VARIANTS entry

    @property
    def id(self) -> str:
        return (f"{self.technique}-{self.kind}-{self.subject}" + (f"-{self.auto}=auto" if self.auto else "")
                + (f"-{self.variant}" if self.variant else ""))

    def config(self) -> StepConfig:
        config = default_config(self.technique)
        if self.auto:
            config = config.model_validate({**config.model_dump(), self.auto: "auto"})
        if self.variant:
            config = config.model_validate({**config.model_dump(), **DATA_VARIANTS[self.technique][self.variant]})
        return config


# Every model family a technique fits, and on its first family also every other kind it accepts
# (an ONNX input is that family's model exported) and the searching variants: those change the
# step's path, not the model it is given, so one family each keeps the suite fast.
CASES = [
    Case(name, kind, subject.name, auto)
    for name in sorted(TECHNIQUES)
    for i, subject in enumerate(subjects_for(name))
    for kind in sorted(TECHNIQUES[name].accepts, reverse=True)[: None if i == 0 else 1]  # torch first
    for auto in [None, *(search_fields(name) if i == 0 else [])]
] + [
    Case(name, sorted(TECHNIQUES[name].accepts, reverse=True)[0], subjects_for(name)[0].name, variant=variant)
    for name in sorted(DATA_VARIANTS) for variant in DATA_VARIANTS[name]
]

def cases() -> list[Any]:
    """``CASES`` as pytest params, named by case id."""
    return [pytest.param(c, id=c.id) for c in CASES]


# --- the test split, recorded --------------------------------------------------------------------


class RecordingSplit:
    """Stands in for ``splits.test``: answers like the real split (so a run goes on and the other
    checks still see its result) and records every use of it in ``uses``."""

    def __init__(self, data: ArrayData) -> None:
        self._data = data
        self.uses: list[str] = []

    def _use(self, what: str) -> ArrayData:
        self.uses.append(what)
        return self._data

    def __getattr__(self, name: str) -> Any:  # x, y, batches, subset, sizes, __deepcopy__, ...
        return getattr(self._use(name), name)

    def __len__(self) -> int:
        return len(self._use("len"))

    def __bool__(self) -> bool:
        return bool(len(self._use("bool")))

    def __iter__(self) -> Iterator[Any]:
        return iter(self._use("iter").x)

    def __getitem__(self, index: Any) -> Any:
        return self._use("getitem").x[index]

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        return np.asarray(self._use("array").x, *args, **kwargs)

    def __repr__(self) -> str:  # error messages may show the splits; that reads no data
        return f"RecordingSplit({len(self._data)} examples)"


# --- inputs and their snapshots ------------------------------------------------------------------


@dataclass
class Inputs:
    state: ModelState
    ctx: StepContext
    test: RecordingSplit
    batch: np.ndarray  # a fixed batch (not the test split) the outputs are compared on


def make_inputs(case: Case, workdir: Path) -> Inputs:
    """The input model (of the case's kind), a context like the pipeline's, and a fixed batch."""
    from shrinkml.runtimes.export import export_onnx

    subject = SUBJECTS[case.subject]
    model = subject.build()
    splits = make_splits(subject.data(), seed=SEED)
    test = RecordingSplit(splits.test)
    splits = Splits(splits.calibration, splits.finetune, test, source=splits.source, seed=splits.seed)  # type: ignore
    example = np.ascontiguousarray(splits.calibration.x[:4])
    teacher = None
    if case.kind == "torch":  # as the pipeline does: a frozen copy of the original, for distillation
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        state = ModelState("torch", torch_model=model)
    else:
        state = ModelState("onnx", onnx_model=export_onnx(model, example))
    ctx = StepContext(
        splits=splits, task=get_task(subject.task), teacher=teacher, example_input=example, seed=SEED,
        threads=THREADS, progress=SILENT, workdir=workdir, budget=Budget(),
    )
    return Inputs(state, ctx, test, np.ascontiguousarray(splits.finetune.x[:8]))


def torch_outputs(module: nn.Module, batch: np.ndarray) -> np.ndarray:
    from shrinkml.runtimes.torch_eager import TorchRunner

    return TorchRunner(module, threads=THREADS).run(batch)


def outputs(state: ModelState, batch: np.ndarray) -> np.ndarray:
    """The model's output on ``batch``, on PyTorch or ONNX Runtime as its kind says."""
    from shrinkml.runtimes.onnxruntime import OrtRunner

    if state.kind == "torch":
        return torch_outputs(state.torch_model, batch)
    return OrtRunner(state.onnx_model.SerializeToString(), threads=THREADS).run(batch)


def module_snapshot(module: nn.Module, batch: np.ndarray | None) -> dict[str, Any]:
    """Everything about a module a step could change: every tensor (state dict and non-persistent
    buffers), the structure, train/eval modes, grad flags, hooks, and its output on ``batch``."""
    tensors = {f"state_dict[{k}]": v.detach().clone() for k, v in module.state_dict().items()}
    tensors.update({f"buffer[{k}]": v.detach().clone() for k, v in module.named_buffers()})
    hook_kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_state_dict_hooks", "_load_state_dict_post_hooks")
    snapshot: dict[str, Any] = {
        "tensors": tensors,
        "structure": repr(module),
        "training": {n: m.training for n, m in module.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
        "hooks": {n: tuple(len(getattr(m, h, {})) for h in hook_kinds) for n, m in module.named_modules()},
    }
    if batch is not None:
        was_training = {n: m.training for n, m in module.named_modules()}
        snapshot["output"] = torch_outputs(module, batch).copy()
        for n, m in module.named_modules():  # TorchRunner put it in eval mode
            m.training = was_training[n]
    return snapshot


def snapshot(inputs: Inputs) -> dict[str, Any]:
    """What a step is given, deep-copied: model state, teacher, example input and the splits."""
    state, ctx = inputs.state, inputs.ctx
    snap: dict[str, Any] = {
        "state fields": (state.kind, id(state.torch_model), id(state.onnx_model), state.sparse_params,
                         state.export_max_abs_diff),
        "example_input": np.array(ctx.example_input, copy=True),
    }
    if state.torch_model is not None:
        snap["model"] = module_snapshot(state.torch_model, inputs.batch)
    if state.onnx_model is not None:
        snap["onnx bytes"] = state.onnx_model.SerializeToString()
    if ctx.teacher is not None:
        snap["teacher"] = module_snapshot(ctx.teacher, inputs.batch)
    for name in ("calibration", "finetune"):
        split = getattr(ctx.splits, name)
        snap[f"splits.{name}"] = (np.array(split.x, copy=True), None if split.y is None else split.y.copy())
    snap["splits.test"] = (np.array(inputs.test._data.x, copy=True), inputs.test._data.y)
    return snap


def differences(before: Any, after: Any, path: str = "") -> list[str]:
    """Where two snapshots differ (exact comparison: dtypes, shapes and values)."""
    if isinstance(before, dict):
        found = [f"{path}{k}: removed" for k in before if k not in after]
        found += [f"{path}{k}: added" for k in after if k not in before]
        for k in before:
            if k in after:
                found += differences(before[k], after[k], f"{path}{k} / ")
        return found
    if isinstance(before, torch.Tensor):
        same = before.dtype == after.dtype and before.shape == after.shape and torch.equal(before, after)
        return [] if same else [f"{path.rstrip(' /')}: changed"]
    if isinstance(before, np.ndarray):
        same = before.dtype == after.dtype and np.array_equal(before, after)
        return [] if same else [f"{path.rstrip(' /')}: changed"]
    if isinstance(before, tuple) and any(isinstance(v, (np.ndarray, torch.Tensor)) for v in before):
        return [d for i, (b, a) in enumerate(zip(before, after)) for d in differences(b, a, f"{path}[{i}] / ")]
    return [] if before == after else [f"{path.rstrip(' /')}: changed"]


# --- one run per case, shared by the checks ------------------------------------------------------


@dataclass
class Run:
    case: Case
    inputs: Inputs
    result: StepResult | None
    error: BaseException | None
    changed: list[str] = field(default_factory=list)

    def ok(self) -> StepResult:
        """The result, or this check fails with the error the step raised."""
        if self.error is not None:
            error = self.error
            raise AssertionError(f"{self.case.id}: apply raised {type(error).__name__}: {error}") from error
        assert isinstance(self.result, StepResult), f"{self.case.id}: apply returned {type(self.result).__name__}"
        return self.result


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    return lambda label: tmp_path_factory.mktemp(label.replace("=", "_"))


def apply_once(
    case: Case, workdir: Path, *, rng_seed: int
) -> tuple[Inputs, StepResult | None, BaseException | None, list[str]]:
    """Apply the case's technique to fresh inputs, with the global random generators seeded with
    ``rng_seed`` (a step must use ``ctx.seed``, not whatever they hold); restores them afterwards."""
    inputs = make_inputs(case, workdir)
    before = snapshot(inputs)
    result = error = None
    state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng_seed)
        np.random.seed(rng_seed)
        random.seed(rng_seed)
        try:
            result = TECHNIQUES[case.technique].apply(inputs.state, case.config(), inputs.ctx)
        except Exception as exc:  # noqa: BLE001  (any error is reported by each check that needs the result)
            error = exc
        finally:
            random.setstate(state)
            np.random.set_state(np_state)
    return inputs, result, error, differences(before, snapshot(inputs))


_RUNS: dict[Case, Run] = {}


@pytest.fixture
def run(request, workdirs) -> Run:
    case = request.param
    if case not in _RUNS:
        inputs, result, error, changed = apply_once(case, workdirs(case.id), rng_seed=1)
        _RUNS[case] = Run(case, inputs, result, error, changed)
    return _RUNS[case]


def parametrize_runs():
    return pytest.mark.parametrize("run", cases(), indirect=True)


# --- the checks ----------------------------------------------------------------------------------


def test_the_registry_is_covered():
    assert TECHNIQUES, "no technique registered"
    for name, technique in TECHNIQUES.items():
        assert technique.accepts, f"{name} accepts no model kind"
        assert technique.accepts <= {"torch", "onnx"}, f"{name}: unknown kinds in accepts {technique.accepts}"
        assert technique.produces in (None, "torch", "onnx"), f"{name}: unknown produces {technique.produces!r}"
    assert set(CONFIG_OVERRIDES) <= set(TECHNIQUES), "CONFIG_OVERRIDES names unregistered techniques"
    assert set(DATA_VARIANTS) <= set(TECHNIQUES), "DATA_VARIANTS names unregistered techniques"
    for table in ("NEEDS_TEXT_ENCODER", "NOT_FOR_TEXT_ENCODER", "NEEDS_CAUSAL_LM"):
        assert globals()[table] <= set(TECHNIQUES), f"{table} names unregistered techniques"


@parametrize_runs()
def test_accepts_the_kinds_it_declares(run):
    run.ok()


@parametrize_runs()
def test_does_not_mutate_its_inputs(run):
    run.ok()
    assert not run.changed, f"{run.case.id} changed what it was given: " + "; ".join(run.changed[:10])


@parametrize_runs()
def test_never_reads_the_test_split(run):
    uses = run.inputs.test.uses  # recorded whether or not the step went on to fail
    assert not uses, f"{run.case.id} used splits.test: {sorted(set(uses))}"
    run.ok()


@parametrize_runs()
def test_summary_is_strict_json(run):
    summary = run.ok().summary
    assert isinstance(summary, dict), f"summary is a {type(summary).__name__}, not a dict"
    assert all(isinstance(k, str) for k in summary), f"summary keys are not all strings: {list(summary)}"
    text = json.dumps(to_jsonable(summary), allow_nan=False)  # what the report writes
    assert isinstance(json.loads(text), dict)


@parametrize_runs()
def test_produces_the_kind_it_declares(run):
    state = run.ok().state
    technique = TECHNIQUES[run.case.technique]
    expected = technique.produces or run.case.kind
    assert isinstance(state, ModelState)
    assert state.kind == expected, f"declares produces={technique.produces!r} but gave a {state.kind} model"
    if state.kind == "torch":
        assert isinstance(state.torch_model, nn.Module)
    else:
        import onnx

        assert isinstance(state.onnx_model, onnx.ModelProto)


def runtimes_for(technique: Technique, kind: str) -> tuple[str, ...]:
    if technique.runtime is not None:
        return (technique.runtime,)
    return ("onnxruntime", "torch") if kind == "torch" else ("onnxruntime",)


@parametrize_runs()
def test_runs_on_the_runtime_it_declares(run, workdirs):
    from shrinkml.artifacts import build_artifact
    from shrinkml.runtimes.onnxruntime import OrtRunner

    state = run.ok().state
    batch = run.inputs.batch
    for runtime in runtimes_for(TECHNIQUES[run.case.technique], state.kind):
        artifact = build_artifact(  # the file the pipeline would deploy and measure
            state, "compressed", runtime=runtime, example=run.inputs.ctx.example_input,
            workdir=workdirs(f"{run.case.id}-{runtime}"), threads=THREADS, export_tolerance=1e-4,
        )
        if runtime == "torch":
            got = torch_outputs(artifact.module, batch)
        else:
            got = OrtRunner(artifact.path, threads=THREADS).run(batch)
        assert got.shape[0] == len(batch), f"{runtime}: output shape {got.shape} for a batch of {len(batch)}"
        assert np.all(np.isfinite(got)), f"{runtime}: non-finite outputs"


@parametrize_runs()
def test_is_deterministic_for_a_seed(run, workdirs):
    first = run.ok().state
    inputs, second, error, _ = apply_once(run.case, workdirs(run.case.id + "-again"), rng_seed=2)
    if error is not None:
        raise AssertionError(f"the second run raised {type(error).__name__}: {error}") from error
    second_state = second.state
    assert second_state.kind == first.kind
    a, b = outputs(first, run.inputs.batch), outputs(second_state, inputs.batch)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=ATOL, err_msg=f"{run.case.id}: two runs with seed {SEED} differ")
    if first.kind == "onnx":
        assert first.onnx_model.SerializeToString() == second_state.onnx_model.SerializeToString(), (
            f"{run.case.id}: the two ONNX graphs differ"
        )
    else:  # the same model, not just the same outputs on one batch
        a_sd, b_sd = first.torch_model.state_dict(), second_state.torch_model.state_dict()
        assert list(a_sd) == list(b_sd), f"{run.case.id}: the two models have different tensors"
        for key, value in a_sd.items():
            assert value.dtype == b_sd[key].dtype and value.shape == b_sd[key].shape, key
            np.testing.assert_allclose(value.float().numpy(), b_sd[key].float().numpy(), rtol=0, atol=ATOL,
                                       err_msg=f"{run.case.id}: {key} differs between two runs")


@pytest.mark.parametrize("name", sorted(TECHNIQUES))
def test_config_round_trips_through_yaml(name, tmp_path):
    config = default_config(name)
    path = tmp_path / "recipe.yaml"
    path.write_text(Recipe.from_steps([config]).to_yaml())
    loaded = Recipe.from_yaml(path).steps[0]
    assert type(loaded) is type(config) and loaded == config, f"{config!r} came back as {loaded!r}"
    plain = yaml.safe_load(yaml.safe_dump(config.model_dump(mode="json")))
    assert TECHNIQUES[name].config_cls.model_validate(plain) == config
    for key in search_fields(name):
        auto = config.model_validate({**config.model_dump(), key: "auto"})
        assert Recipe.from_dict(yaml.safe_load(Recipe.from_steps([auto]).to_yaml())).steps[0] == auto
