"""Test-protocol presets (protocol sections 3-5): how many episodes, which seeds, how they
are sampled, at which size images are fed and scored.

| preset | episodes | runs x seeds | sampling | test size | scored at |
|---|---|---|---|---|---|
| pfenet | 5000 PASCAL / 20000 COCO | 1 x 321 | list_order | pfenet_pad 473 / 641 | original resolution |
| bam | 1000 | 5 x ``np.random.seed(123); randint(0, 1000, 5)`` | list_order | pfenet_pad 473 / 641 | original resolution |
| hsnet | 1000 | 1 x 0 | pairs (PASCAL), class_uniform (COCO) | square 400 | 400x400 (``score_at_original`` optional) |
| panet | 1000 per run | 5 x 1234+run | panet | square 417 | 417x417 |
| canet | 1000 | 1 x 0 (unsure: not in the spec table) | class_uniform | square 321 | 321x321, ignore_index None (255 = background) |

The synthetic dataset follows the PASCAL rules; pass ``size=`` (e.g. 65) for its small
images. Extra runs of a preset get seeds by its rule: bam draws more values from the same
legacy stream, panet 1234+run, the others ``base seed + run``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fss.data.classes import check_dataset
from fss.data.episodes import (
    TEST_SAMPLINGS,
    EpisodeDataset,
    EpisodeSpec,
    build_test_episodes,
    episode_class_counts,
)
from fss.data.prepared import PreparedDataset
from fss.data.transforms import TEST_RESIZE_MODES, TestTransform
from fss.errors import ConfigError

PRESETS = ("pfenet", "bam", "hsnet", "panet", "canet")


def bam_seeds(runs: int = 5, seed: int = 123) -> tuple[int, ...]:
    """BAM's test seeds: ``np.random.seed(123); np.random.randint(0, 1000, runs)`` with the
    legacy RandomState API (a private RandomState, same stream, global state untouched)."""
    return tuple(int(s) for s in np.random.RandomState(seed).randint(0, 1000, runs))


@dataclass(frozen=True)
class TestProtocol:
    """One evaluation protocol; every field is logged with each reported number."""

    __test__ = False  # not a pytest class

    name: str
    dataset: str
    episodes: int
    runs: int
    seeds: tuple[int, ...]
    sampling: str
    resize: str
    size: int
    score_at_original: bool
    ignore_index: int | None = 255
    #: PFENet's test loop runs one episode more than asked (``(iter_num - 1) * bs >= test_num``
    #: breaks one late); True reproduces it. Default False.
    extra_episode: bool = False

    def __post_init__(self):
        if self.sampling not in TEST_SAMPLINGS:
            raise ConfigError(f"unknown sampling {self.sampling!r}; choose one of: {', '.join(TEST_SAMPLINGS)}.")
        if self.resize not in TEST_RESIZE_MODES:
            raise ConfigError(f"unknown resize mode {self.resize!r}; choose one of: {', '.join(TEST_RESIZE_MODES)}.")
        for field in ("episodes", "runs", "size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"protocol {field}={value!r} must be a positive integer.")
        if len(self.seeds) != self.runs:
            raise ConfigError(f"protocol has runs={self.runs} but {len(self.seeds)} seeds {list(self.seeds)}; give one seed per run.")
        if self.ignore_index not in (255, None):
            raise ConfigError(f"ignore_index={self.ignore_index!r}; choose 255 or None (255 counts as background).")

    @property
    def episodes_per_run(self) -> int:
        return self.episodes + (1 if self.extra_episode else 0)

    def transform(self) -> TestTransform:
        return TestTransform(self.resize, self.size)

    def episode_specs(self, data: PreparedDataset, shot: int, run: int = 0, ways: int = 1) -> list[EpisodeSpec]:
        """The episodes of run ``run`` (seed ``seeds[run]``)."""
        if not 0 <= run < self.runs:
            raise ConfigError(f"run {run} does not exist; protocol {self.name} has runs 0..{self.runs - 1}.")
        return build_test_episodes(data, sampling=self.sampling, episodes=self.episodes_per_run,
                                   seed=self.seeds[run], shot=shot, ways=ways)

    def episode_dataset(self, data: PreparedDataset, shot: int, run: int = 0, ways: int = 1,
                        support_annotation: str = "dense", image_cache=None) -> EpisodeDataset:
        """The run's episodes with this protocol's test transform (original labels kept);
        ``image_cache``: a :class:`fss.data.episodes.TestImageCache` shared by the calls."""
        specs = self.episode_specs(data, shot, run, ways)
        return EpisodeDataset(data, specs, self.transform(), seed=self.seeds[run],
                              support_annotation=support_annotation, keep_original=True, image_cache=image_cache)

    def describe(self) -> dict:
        """Plain dict for metric files and run logs."""
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.seeds)
        d["episodes_per_run"] = self.episodes_per_run
        return d


def _preset_fields(name: str, dataset: str) -> dict:
    coco = dataset == "coco"
    if name == "pfenet":
        return dict(episodes=20000 if coco else 5000, seeds=(321,), sampling="list_order",
                    resize="pfenet_pad", size=641 if coco else 473, score_at_original=True)
    if name == "bam":
        return dict(episodes=1000, seeds=bam_seeds(5), sampling="list_order",
                    resize="pfenet_pad", size=641 if coco else 473, score_at_original=True)
    if name == "hsnet":
        return dict(episodes=1000, seeds=(0,), sampling="class_uniform" if coco else "pairs",
                    resize="square", size=400, score_at_original=False)
    if name == "panet":
        return dict(episodes=1000, seeds=tuple(1234 + r for r in range(5)), sampling="panet",
                    resize="square", size=417, score_at_original=False)
    return dict(episodes=1000, seeds=(0,), sampling="class_uniform", resize="square", size=321,
                score_at_original=False, ignore_index=None)


def _seeds_for_runs(name: str, base: tuple[int, ...], runs: int) -> tuple[int, ...]:
    if name == "bam":
        return bam_seeds(runs)
    if name == "panet":
        return tuple(1234 + r for r in range(runs))
    return tuple(base[0] + r for r in range(runs))


def protocol_preset(name: str, dataset: str, **overrides) -> TestProtocol:
    """The named preset for ``dataset`` with ``overrides`` applied (any TestProtocol field
    but name/dataset). Giving ``runs`` without ``seeds`` extends the preset's seed rule;
    giving ``seeds`` alone sets ``runs`` to their number."""
    if name not in PRESETS:
        raise ConfigError(f"unknown test protocol {name!r}; choose one of: {', '.join(PRESETS)}.")
    check_dataset(dataset)
    allowed = [f.name for f in dataclasses.fields(TestProtocol) if f.name not in ("name", "dataset")]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown protocol option(s) {', '.join(unknown)}; choose from: {', '.join(allowed)}.")
    fields = _preset_fields(name, dataset)
    if "seeds" in overrides:
        overrides["seeds"] = tuple(int(s) for s in overrides["seeds"])
        overrides.setdefault("runs", len(overrides["seeds"]))
    elif "runs" in overrides:
        overrides["seeds"] = _seeds_for_runs(name, fields["seeds"], int(overrides["runs"]))
    fields.setdefault("runs", len(fields["seeds"]))
    fields.update(overrides)
    return TestProtocol(name=name, dataset=dataset, **fields)


__all__ = [
    "PRESETS",
    "TestProtocol",
    "bam_seeds",
    "episode_class_counts",
    "protocol_preset",
]
