"""The LUM pipeline: lum_pretrain → lum_query → lum_finetune, as TorchX jobs on any scheduler.

    recsys pipeline run --experiment configs/ml100k/2026-12-01-study.yaml   # its `lum` arm

This module owns the order of LUM's three steps (LUM, §4) for a study and the rankers of
step 3: each model of ``rankers`` (GPSD's Transformer ranker ``gpsd``, ``din``, ``deepfm``)
alone (``DLRM``), with the user model's outputs as features (``+LUM``), and with the
interest-matching similarities too (``+LUM+match``). Stages are submitted, skipped when DONE
with the same fingerprint and resumed exactly as in ``recsys.pipelines.gpsd``, whose runner it uses.

Layout: ``EXPERIMENT/<size>/[seed-<n>/]{lum_pretrain, lum_query,
lum_finetune-[<train>-]<arch>-<dlrm|lum|match|lum_match>}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recsys.pipelines.gpsd import (
    PipelineError,
    Step,
    chains,
    check_sizes,
    join,
    placed,
    pretraining,
)

RANKERS = ("gpsd", "din", "deepfm")
VARIANTS = {  # name in reports → (features, direct, matching)
    "DLRM": (False, False, False),
    "+LUM": (True, True, False),
    "+LUM match": (True, False, True),
    "+LUM+match": (True, True, True),
}
DEFAULT_VARIANTS = ("DLRM", "+LUM", "+LUM+match")


@dataclass(frozen=True)
class LumStudy:
    """What one LUM run covers."""

    experiment: str
    data: str
    """Directory with ``seq/`` (condition features declared), ``ctr_train/``, ``ctr_test/``."""
    config: str | None = None
    sizes: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    rankers: tuple[str, ...] = ("gpsd", "din")
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    overrides: tuple[str, ...] = ()
    pretrain_overrides: tuple[str, ...] = ()
    finetune_overrides: tuple[str, ...] = ()
    train: str = "ctr_train"
    test: str = "ctr_test"

    def __post_init__(self) -> None:
        wrong = [r for r in self.rankers if r not in RANKERS]
        if wrong or not self.rankers:
            raise PipelineError(f"rankers {wrong}: choose among {', '.join(RANKERS)}")
        wrong = [v for v in self.variants if v not in VARIANTS]
        if wrong or not self.variants:
            raise PipelineError(f"variants {wrong}: choose among {', '.join(VARIANTS)}")
        check_sizes(self.sizes)


def slug(variant: str) -> str:
    """``+LUM+match`` → ``lum_match``, ``+LUM match`` → ``match``, ``DLRM`` → ``dlrm``."""
    return {"DLRM": "dlrm", "+LUM": "lum", "+LUM match": "match", "+LUM+match": "lum_match"}[
        variant
    ]


def plan(study: LumStudy) -> list[Step]:
    """The steps of ``study`` in the order they run."""
    seq, train, test = (join(study.data, n) for n in ("seq", study.train, study.test))
    experiment = Path(study.experiment)
    # Another training set than ctr_train: its name in the rankers' directories, so arms on
    # other sets never share them (as recsys.pipelines.gpsd does).
    tag = "" if study.train == "ctr_train" else study.train.removeprefix("ctr_") + "-"
    asks = any(VARIANTS[v][0] for v in study.variants)
    steps: list[Step] = []
    for size, root, common in chains(study):
        pretrain, query = root / "lum_pretrain", root / "lum_query"
        if asks:  # the rankers alone need no user model
            steps.append(pretraining("lum_pretrain", pretrain, study, common, seq, size))
            steps.append(
                Step(
                    "lum_query",
                    query,
                    {},
                    ["--init", str(pretrain)],
                    [*common, f"data.train={seq}"],
                    lambda c, p=str(pretrain): {"train": seq, "init": p},
                    size,
                )
            )
        for arch in study.rankers:
            for variant in study.variants:
                features, direct, matching = VARIANTS[variant]
                lum = [f"lum.direct={direct}", f"lum.matching={matching}"]
                if features:
                    lum.append(f"lum.features={query}")
                steps.append(
                    Step(
                        "lum_finetune",
                        root / f"lum_finetune-{tag}{arch}-{slug(variant)}",
                        {},
                        [],
                        [
                            *common,
                            *study.finetune_overrides,
                            f"model.arch={arch}",
                            f"data.train={train}",
                            f"data.valid={test}",
                            *(lum if features else []),
                        ],
                        lambda c: {
                            "train": train,
                            "valid": test,
                            "features": c.lum.features,
                        },
                        size,
                        variant,
                    )
                )
    return placed(steps, experiment, study.config)


def run(study: LumStudy, profile="local_cwd", profiles_path=None, console=None):
    """Run every step of ``study`` that is not DONE; the steps, with ``skipped`` set."""
    import sys

    from recsys.pipelines.gpsd import run_steps

    return run_steps(
        plan(study),
        study.experiment,
        profile,
        profiles_path,
        console if console is not None else sys.stdout,
    )
