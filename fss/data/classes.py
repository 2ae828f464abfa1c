"""Class ids, names and fold splits (protocol section 1).

Class ids are 1-based everywhere: PASCAL/synthetic 1..20, COCO 1..80 (position in the
sorted list of COCO category ids). 0 is background and 255 is ignore in every mask.
"""

from __future__ import annotations

from fss.errors import ConfigError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

DATASETS = ("pascal", "coco", "synthetic")

#: fold conventions per dataset; the first is the default
CONVENTIONS = {
    "pascal": ("pascal",),
    "synthetic": ("pascal",),
    "coco": ("interleaved", "contiguous"),
}

NUM_CLASSES = {"pascal": 20, "synthetic": 20, "coco": 80}
NUM_FOLDS = 4
IGNORE_INDEX = 255


def check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}.")
    return dataset


def check_convention(dataset: str, convention: str | None) -> str:
    allowed = CONVENTIONS[check_dataset(dataset)]
    if convention is None:
        return allowed[0]
    if convention not in allowed:
        raise ConfigError(
            f"unknown fold convention {convention!r} for {dataset}; choose one of: {', '.join(allowed)}."
        )
    return convention


def check_fold(fold: int) -> int:
    if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < NUM_FOLDS:
        raise ConfigError(f"unknown fold {fold!r}; choose one of: 0, 1, 2, 3.")
    return fold


def novel_classes(dataset: str, fold: int, convention: str | None = None) -> list[int]:
    """The fold's novel (test) classes, 1-based, sorted."""
    convention = check_convention(dataset, convention)
    fold = check_fold(fold)
    if convention == "pascal":
        return list(range(5 * fold + 1, 5 * fold + 6))
    if convention == "interleaved":  # PFENet use_split_coco=True, HSNet, BAM
        return list(range(fold + 1, 81, 4))
    return list(range(20 * fold + 1, 20 * fold + 21))  # contiguous: PANet, PFENet False


def base_classes(dataset: str, fold: int, convention: str | None = None) -> list[int]:
    """The fold's base (training) classes: every class that is not novel."""
    novel = set(novel_classes(dataset, fold, convention))
    return [c for c in range(1, NUM_CLASSES[dataset] + 1) if c not in novel]


def split_classes(dataset: str, fold: int, split: str, convention: str | None = None) -> list[int]:
    """Classes of a list split: ``train`` -> base classes, ``val`` (test) and ``holdout``
    (validation images kept out of the test lists) -> novel classes."""
    if split == "train":
        return base_classes(dataset, fold, convention)
    if split in ("val", "holdout"):
        return novel_classes(dataset, fold, convention)
    raise ConfigError(f"unknown split {split!r}; choose one of: train, val, holdout.")
