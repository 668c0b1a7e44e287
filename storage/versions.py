"""A model version: what its ``info.json`` holds (``VersionInfo``), its life (``ModelVersion``), and the
rule that makes one the registry's BEST (``Score``, ``promotion``). The only code that reads or writes
a version's info; ``storage/registry.py`` stores the bytes.

A version's life, and who moves it along:

    open (tasks/versions.py: open_version) -> status "training", attempts 1
      -> reopen after a killed run (attempts + 1) ... or abandon after too many (status "abandoned")
      -> record_epoch per epoch; record_model with the weights (unet/checkpoint.py: save_model),
         record_training at the end (tasks/train.py): status "complete"
      -> record_postprocess (tasks/evaluate.py): the rule chosen on its held-out cases, and its score
         there; a fold: record_out_of_fold; an ensemble (register_ensemble): record_cv
      -> record_quality (tasks/quality.py): the calibration of its quality estimate
      -> promote (tasks/versions.py: promote_if_best) when ``promotion`` says it beats BEST
      -> record_evaluation (flows/evaluate.py), any number of times

**Promotion, like for like.** A version's ``score`` is its per-case Dice (WT, TC, ET) on cases it
never trained on: a single model's validation cases, an ensemble's out-of-fold cases. A candidate
becomes BEST only when its mean Dice is at least ``FLOOR`` (0.5, or ``$BRATS_BEST_FLOOR``) and it
beats the current BEST's mean on the cases both were scored on, at least ``MIN_SHARED`` of them;
with fewer shared cases, or a BEST without a per-case score, the two are not comparable and BEST
stays (``brats models best`` decides).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from storage.registry import Registry

REGIONS = ("WT", "TC", "ET")
FLOOR = 0.5  # the least mean Dice (WT, TC, ET) on held-out cases a version needs to become BEST


def floor() -> float:
    """``FLOOR``, or ``$BRATS_BEST_FLOOR`` where set (0: any version that beats BEST)."""
    return float(os.environ.get("BRATS_BEST_FLOOR", FLOOR))


MIN_SHARED = 3  # the fewest cases two versions must both have been scored on to be compared


class Score(BaseModel):
    """Per-case Dice of a version on cases it never trained on: the measure promotion compares."""

    measure: Literal["validation", "out-of-fold"]
    cases: dict[str, dict[str, float]]  # case id -> {"WT": dice, "TC": dice, "ET": dice}

    @classmethod
    def of(cls, measure: str, rows: list[dict]) -> Score:
        """From table rows with ``case`` and ``dice_WT``/``dice_TC``/``dice_ET``."""
        return cls(measure=measure, cases={r["case"]: {k: float(r[f"dice_{k}"]) for k in REGIONS} for r in rows})

    def mean(self, cases: list[str] | None = None) -> float:
        """Mean over regions and the given cases (default: all of them)."""
        chosen = self.cases if cases is None else cases
        return statistics.fmean(self.cases[c][k] for c in chosen for k in REGIONS) if chosen else 0.0


class VersionInfo(BaseModel):
    """Every key of ``info.json``. Keys an older version wrote and this code no longer uses are kept."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    version: str
    created: float = 0.0
    status: Literal["training", "complete", "abandoned"] = "complete"
    kind: Literal["model", "ensemble"] = "model"
    members: list[str] = []  # an ensemble's fold versions
    fold: int | None = None  # a cross-validation's fold this version trained without
    model: dict[str, Any] = {}  # the UNetConfig fields
    profile: str | None = None  # the store's preprocessing profile
    store: str | None = None
    store_fingerprint: str | None = None
    split: dict[str, Any] = {}  # train / val case ids (an ensemble: "folds", each fold's val cases)
    train_config: dict[str, Any] = {}  # the TrainConfig fields
    packages: dict[str, str] = Field({}, validation_alias=AliasChoices("packages", "versions"))
    attempts: int = 1
    epochs_done: int = 0
    last_epoch: dict[str, Any] | None = None
    history: list[dict[str, Any]] = []
    device: str | None = None
    files: dict[str, str] = {}
    seconds: float | None = None
    metrics: dict[str, float] = {}  # validation (or cross-validated) means: dice_WT …, dice_mean
    postprocess: dict[str, Any] | None = None  # the PostProcess rule chosen on held-out cases
    postprocess_choice: dict[str, Any] | None = None  # how it was chosen, before/after scores
    out_of_fold: list[dict[str, Any]] = []  # a fold version: its validation cases' scores
    cv: dict[str, Any] | None = None  # an ensemble: per case, per fold, summary, post-processing
    score: Score | None = None  # what promotion compares
    quality: dict[str, Any] | None = None  # the quality estimate's calibration (tasks/quality.py)
    evaluation: dict[str, Any] | None = None  # the last `brats evaluate` record

    def measure(self) -> str:
        """How the version is scored, for a person: ``out-of-fold 21 cases, Dice 0.758``."""
        if self.score is None:
            return "no per-case score"
        return f"{self.score.measure} {len(self.score.cases)} cases, Dice {self.score.mean():.3f}"


class ModelVersion:
    """One version of a registry and its life; every change is read, validated and written whole."""

    def __init__(self, registry: Registry | str, version: str):
        self.registry = registry if isinstance(registry, Registry) else Registry(registry)
        self.version = version

    @classmethod
    def open(cls, registry: Registry | str, **fields: Any) -> ModelVersion:
        """A new version with these fields (``VersionInfo``'s)."""
        registry = registry if isinstance(registry, Registry) else Registry(registry)
        version = registry.new_id()
        info = VersionInfo(version=version, created=time.time(), **fields)
        registry.put(version, Registry.INFO, info.model_dump_json(indent=2).encode())
        return cls(registry, version)

    @classmethod
    def resolve(cls, registry: Registry | str, version: str | None = None) -> ModelVersion:
        """``None``/``"best"``, ``"latest"`` or an id, as ``Registry.resolve`` reads them."""
        registry = registry if isinstance(registry, Registry) else Registry(registry)
        return cls(registry, registry.resolve(version))

    @property
    def info(self) -> VersionInfo:
        return VersionInfo.model_validate(self.registry.info(self.version))

    def _update(self, **fields: Any) -> VersionInfo:
        info = self.info.model_copy(update=fields)
        info = VersionInfo.model_validate(info.model_dump())  # validated as a whole
        self.registry.put(self.version, Registry.INFO, info.model_dump_json(indent=2).encode())
        return info

    # ------------------------------------------------------------ the lifecycle

    def reopen(self) -> int:
        """Another attempt at an unfinished training; returns its number."""
        return self._update(attempts=self.info.attempts + 1).attempts

    def abandon(self) -> None:
        self._update(status="abandoned")

    def record_epoch(self, row: dict) -> None:
        self._update(epochs_done=row["epoch"], last_epoch=row)

    def record_model(self, model: dict) -> None:
        """The network's config (``UNetConfig`` fields), as its weights are written."""
        self._update(model=model)

    def record_training(self, metrics: dict, history: list, files: dict, device: str) -> None:
        self._update(status="complete", metrics=metrics, history=history, files=files, device=device)

    def record_postprocess(self, rule: dict, choice: dict, score: Score | None = None) -> None:
        """The post-processing chosen on held-out cases, and (a single model) its score there."""
        self._update(postprocess=rule, postprocess_choice=choice, **({"score": score} if score else {}))

    def record_out_of_fold(self, rows: list[dict]) -> None:
        self._update(out_of_fold=rows)

    def record_cv(self, metrics: dict, cv: dict, seconds: float | None = None) -> None:
        """An ensemble's cross-validation: its metrics, and its out-of-fold per-case score."""
        self._update(metrics=metrics, cv=cv, score=Score.of("out-of-fold", cv["per_case"]), seconds=seconds)

    def record_seconds(self, seconds: float) -> None:
        self._update(seconds=seconds)

    def record_quality(self, calibration: dict) -> None:
        self._update(quality=calibration)

    def record_evaluation(self, record: dict) -> None:
        self._update(evaluation=record)

    def promote(self) -> None:
        self.registry.set_best(self.version)


def listed(registry: Registry | str) -> list[VersionInfo]:
    """Every version of a registry, oldest first."""
    registry = registry if isinstance(registry, Registry) else Registry(registry)
    return [VersionInfo.model_validate(info) for info in registry.versions()]


def promotion(candidate: VersionInfo, best: VersionInfo | None) -> tuple[bool, str]:
    """(promote?, why) by the like-for-like rule of this module's docstring."""
    if candidate.status != "complete":
        return False, f"{candidate.version} is {candidate.status}"
    if candidate.score is None:
        return False, f"{candidate.version} has no per-case score on held-out cases"
    own, least = candidate.score.mean(), floor()
    if own < least:
        measure = candidate.score.measure
        return False, f"{candidate.version}: mean Dice {own:.3f} on its {measure} cases is below the floor {least}"
    if best is None:
        return True, f"no BEST yet; {candidate.measure()}"
    if best.score is None:
        return False, f"BEST {best.version} has no per-case score to compare with: not comparable"
    shared = sorted(set(candidate.score.cases) & set(best.score.cases))
    if len(shared) < MIN_SHARED:
        return False, (
            f"not comparable: {candidate.version} ({candidate.measure()}) and BEST {best.version} "
            f"({best.measure()}) share {len(shared)} scored case(s), {MIN_SHARED} needed"
        )
    mine, theirs = candidate.score.mean(shared), best.score.mean(shared)
    verdict = f"on {len(shared)} shared cases mean Dice {mine:.3f} against BEST {best.version}'s {theirs:.3f}"
    return mine > theirs, verdict
