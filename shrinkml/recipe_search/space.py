"""The space a search samples recipes from, built from the registered techniques.

A searched recipe is an optional fixed prefix, then one step (or none) per stage, in the order of
``shrinkml.techniques.base.STAGES``: a structural step, recovery training (only after a structural
step), a quantizer, a finishing step. A stage's candidates are the registered techniques of that
stage that the model and the runtime can take; each candidate's hyperparameters come from its
config's ``searchable`` fields and are addressed ``technique__field`` (scikit-learn's
``step__param``), e.g. ``prune.channels__channel_ratio``. A search-space YAML file narrows or
widens it::

    exclude: [quantize.qat]              # techniques never chosen
    stages:                              # a stage's candidates; "none" lets the stage be skipped
      quantize: [quantize.static, quantize.dynamic]
    params:
      prune.channels__channel_ratio: {low: 0.3, high: 0.7, step: 0.1}
      finetune__epochs: 40               # a fixed value
      quantize.static__calibration: {choices: [minmax, percentile]}
    prefix:                              # steps every trial starts with
      - {technique: prune.magnitude, sparsity: 0.5}

Validation is light: it imports the registry's configs, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shrinkml.errors import InputError

NONE = "none"
SEP = "__"


class _Range(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    low: float | None = None
    high: float | None = None
    step: float | None = Field(None, gt=0)
    log: bool = False
    choices: list[Any] | None = Field(None, min_length=1)


class SpaceFile(BaseModel):
    """A search-space YAML file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exclude: tuple[str, ...] = ()
    stages: dict[str, tuple[str, ...]] = {}
    params: dict[str, Any] = {}
    prefix: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: a choice list, or a numeric range (int when every bound is)."""

    name: str  # technique__field
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    fixed: Any = None
    is_fixed: bool = False

    def describe(self) -> str:
        if self.is_fixed:
            return f"{self.fixed!r}"
        if self.choices is not None:
            return "{" + ", ".join(map(repr, self.choices)) + "}"
        scale = ", log" if self.log else ""
        step = f" step {self.step:g}" if self.step else ""
        return f"{self.low:g}..{self.high:g}{step}{scale}"

    def suggest(self, trial) -> Any:
        if self.is_fixed:
            return self.fixed
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step or 1))
        if ints:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        value = trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)
        return round(value, 10) if self.step else value  # 0.30000000000000004 -> 0.3, for the recipe


@dataclass(frozen=True)
class Space:
    """What a trial samples: per stage, its candidate techniques; per technique, its params."""

    stages: dict[str, tuple[str, ...]]  # stage -> candidates, NONE included where the stage may be skipped
    params: dict[str, tuple[Param, ...]]  # technique -> its params
    prefix: tuple[dict[str, Any], ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)  # technique -> why it is not in the space

    def suggest(self, trial) -> list[dict[str, Any]]:
        """The recipe steps of one trial (define-by-run: a technique's params only when it is chosen)."""
        steps = [dict(step) for step in self.prefix]
        structural = False
        for stage, candidates in self.stages.items():
            if stage == "recovery" and not structural:
                continue  # recovery training only after a structural step
            name = candidates[0] if len(candidates) == 1 else trial.suggest_categorical(f"stage{SEP}{stage}", list(candidates))
            if name == NONE:
                continue
            structural = structural or stage == "structure"
            steps.append({"technique": name, **{p.name.split(SEP, 1)[1]: p.suggest(trial) for p in self.params[name]}})
        return steps

    def describe(self) -> dict[str, Any]:
        return {
            "prefix": [dict(s) for s in self.prefix],
            "stages": {stage: list(c) for stage, c in self.stages.items()},
            "params": {p.name: p.describe() for ps in self.params.values() for p in ps},
            "left_out": dict(self.skipped),
        }


def load_space_file(path: str | Path) -> SpaceFile:
    from shrinkml.untrusted import decode_utf8, load_yaml, read_bounded

    path = Path(path)
    if not path.is_file():
        raise InputError("search space file not found", where=str(path), fix="check the path given to --space")
    data = read_bounded(path, 256 * 1024, what="search space file", fix="a search space is a short YAML file")
    raw = load_yaml(decode_utf8(data, where=str(path)), where=str(path), what="search space file")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError("the search space file must be a mapping", where=str(path),
                         expected="keys exclude, stages, params, prefix", found=type(raw).__name__,
                         fix="write it as a YAML mapping")
    try:
        return SpaceFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise InputError(
            f"the search space file is not valid: {err['msg']}",
            where=f"{path}: {loc}",
            expected="keys exclude, stages, params, prefix (see `shrinkml search --help`)",
            found=repr(err.get("input"))[:120],
            fix="correct that entry",
        ) from None


def _why_not(technique, loaded, runtime_name: str) -> str | None:
    """Why ``technique`` cannot be a step of a recipe for ``loaded`` measured on ``runtime_name``."""
    from shrinkml.runtimes import runtime

    if loaded.kind not in technique.accepts:
        return f"takes {', '.join(sorted(technique.accepts))} models, the model is {loaded.kind}"
    produces = technique.produces
    if produces is not None and produces not in runtime(runtime_name).accepts:
        return f"makes an {produces.upper()} model, which {runtime_name} cannot run"
    if getattr(loaded, "lm", None) is not None:  # a causal LM: its steps write GGUF, which every LM runtime runs
        from shrinkml.techniques.base import lm_refusal

        return lm_refusal(technique, loaded)
    if technique.runtime is not None and technique.runtime != runtime_name:
        return f"its result runs only on {technique.runtime}, the search measures on {runtime_name}"
    if technique.name == "quantize.nncf" and runtime_name != "openvino":
        return "OpenVINO's quantizer: search with --runtime openvino"
    if technique.applies is not None:
        return technique.applies(loaded)
    return None


def _param(name: str, spec: Any, config_cls, where: str) -> Param:
    """A Param from a declared or user-given spec, each bound checked against the config's own rules."""
    field_name = name.split(SEP, 1)[1]

    def check(value: Any) -> None:
        try:
            config_cls(**{field_name: value})
        except ValidationError as exc:
            raise InputError(
                f"{name} cannot take the value {value!r}: {exc.errors()[0]['msg']}",
                where=where, fix=f"use values {config_cls.__name__}.{field_name} accepts (`shrinkml techniques`)",
            ) from None

    if not isinstance(spec, dict):  # a fixed value
        check(spec)
        return Param(name, fixed=spec, is_fixed=True)
    try:
        r = _Range.model_validate(spec)
    except ValidationError as exc:
        raise InputError(f"{name}: {exc.errors()[0]['msg']}", where=where,
                         expected="{low, high[, step][, log]} or {choices: [...]} or a fixed value",
                         found=repr(spec)[:120], fix="correct the range") from None
    if r.choices is not None:
        for value in r.choices:
            check(value)
        return Param(name, choices=tuple(r.choices))
    if r.low is None or r.high is None or not r.low < r.high:
        raise InputError(f"{name}: a range needs low < high", where=where, found=repr(spec)[:120],
                         fix="give low and high, low below high, or a list of choices")
    for value in (r.low, r.high):
        check(int(value) if float(value).is_integer() and isinstance(spec.get("low"), int) else value)
    low, high, step = (spec.get(k) for k in ("low", "high", "step"))
    return Param(name, low=low, high=high, step=step, log=r.log)


def build_space(loaded, runtime_name: str, space_file: SpaceFile | None = None, *, where: str = "search space") -> Space:
    """The search space for ``loaded`` on ``runtime_name``: registered techniques by stage, narrowed
    or widened by ``space_file``."""
    from shrinkml.recipe import as_recipe
    from shrinkml.techniques.base import STAGES, registry

    techniques = registry()
    sf = space_file or SpaceFile()
    for name in sf.exclude:
        if name not in techniques:
            raise InputError(f"unknown technique {name!r} in exclude", where=f"{where}: exclude",
                             expected="one of " + ", ".join(sorted(techniques)), fix="correct or remove it")
    for stage in sf.stages:
        if stage not in STAGES:
            raise InputError(f"unknown stage {stage!r}", where=f"{where}: stages",
                             expected="one of " + ", ".join(STAGES), fix="correct or remove it")

    skipped: dict[str, str] = {}
    stages: dict[str, tuple[str, ...]] = {}
    for stage in STAGES:
        if stage in sf.stages:
            names = tuple(dict.fromkeys(sf.stages[stage]))
            for name in names:
                if name == NONE:
                    continue
                if name not in techniques:
                    raise InputError(f"unknown technique {name!r}", where=f"{where}: stages.{stage}",
                                     expected="one of " + ", ".join(sorted(techniques)), fix="correct it")
                if techniques[name].stage != stage:
                    raise InputError(f"{name} is not a {stage} step", where=f"{where}: stages.{stage}",
                                     found=f"its stage is {techniques[name].stage}", fix=f"list it under stages.{techniques[name].stage}")
                reason = _why_not(techniques[name], loaded, runtime_name)
                if reason:
                    raise InputError(f"{name} cannot take this model: {reason}", where=f"{where}: stages.{stage}",
                                     fix="remove it from the stage")
        else:
            names = [NONE]
            for name, technique in sorted(techniques.items()):
                if technique.stage != stage:
                    continue
                reason = "excluded by the search space file" if name in sf.exclude else _why_not(technique, loaded, runtime_name)
                if reason:
                    skipped[name] = reason
                else:
                    names.append(name)
            names = tuple(names)
        names = tuple(n for n in names if n == NONE or n not in sf.exclude)
        if any(n != NONE for n in names):
            stages[stage] = names

    from shrinkml.runtimes import runtime

    # a runtime whose artifact holds only some of a field's values narrows the default choices (ORT
    # GenAI's MatMulNBits: Q4_0 and Q8_0 of quantize.gguf's formats)
    narrowed: dict[str, tuple] = getattr(runtime(runtime_name), "search_choices", {})
    params: dict[str, list[Param]] = {}
    for candidates in stages.values():
        for name in candidates:
            if name == NONE:
                continue
            declared = {f"{name}{SEP}{k}": v for k, v in techniques[name].search_params().items()}
            for full, allowed in narrowed.items():
                if full in declared and "choices" in declared[full]:
                    declared[full] = {**declared[full], "choices": [c for c in declared[full]["choices"] if c in allowed]}
            params[name] = [_param(n, spec, techniques[name].config_cls, f"{techniques[name].config_cls.__name__}")
                            for n, spec in declared.items()]
    for full, spec in sf.params.items():
        name, _, field_name = full.partition(SEP)
        if name not in params:
            raise InputError(f"{full!r} names no technique of this search space", where=f"{where}: params",
                             expected=f"technique{SEP}field for one of " + ", ".join(sorted(params)),
                             fix="correct the name, or add the technique to a stage")
        if field_name not in techniques[name].config_cls.model_fields or field_name == "technique":
            raise InputError(f"{name} has no field {field_name!r}", where=f"{where}: params.{full}",
                             expected=", ".join(f for f in techniques[name].config_cls.model_fields if f != "technique"),
                             fix="correct the field name")
        given = _param(full, spec, techniques[name].config_cls, f"{where}: params.{full}")
        if full in narrowed:
            values = (given.fixed,) if given.is_fixed else given.choices or ()
            outside = [v for v in values if v not in narrowed[full]]
            if outside or not values:
                raise InputError(f"{full} on --runtime {runtime_name} takes only {', '.join(map(str, narrowed[full]))}",
                                 where=f"{where}: params.{full}", found=repr(spec)[:120],
                                 fix=f"give choices among {', '.join(map(str, narrowed[full]))}, or search on another"
                                 " runtime (llamacpp takes every block format)")
        params[name] = [p for p in params[name] if p.name != full] + [given]
    prefix = tuple(dict(step) for step in sf.prefix)
    if prefix:
        as_recipe([dict(s) for s in prefix])  # a bad prefix step is refused here, with the recipe's message
    if not prefix and not any(c != NONE for cands in stages.values() for c in cands):
        by_reason: dict[str, list[str]] = {}
        for name, why in sorted(skipped.items()):
            by_reason.setdefault(why, []).append(name)
        reasons = "; ".join(f"{', '.join(names)}: {why}" for why, names in sorted(by_reason.items(), key=lambda kv: len(kv[1])))
        raise InputError("no technique of the search space can take this model, so a search has nothing to try",
                         where=where, found=reasons[:900] or "every technique excluded",
                         fix="fix what the reasons name (quantize.gguf takes a .gguf file, or a directory it can"
                         " convert to one), or widen the search space file")
    return Space(stages, {k: tuple(v) for k, v in params.items()}, prefix, skipped)
