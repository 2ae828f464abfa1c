"""Opening a fold's prepared list, optionally with decoded images kept in memory."""

from __future__ import annotations

from fss.data.prepared import PreparedDataset
from fss.errors import DataError


class CachedPreparedDataset(PreparedDataset):
    """PreparedDataset whose ``load`` remembers what it decoded."""

    def load(self, i: int):
        cache = self.__dict__.setdefault("_loaded", {})
        if i not in cache:
            image, mask = super().load(i)
            image.setflags(write=False)  # shared between episodes: never modified in place
            mask.setflags(write=False)
            cache[i] = (image, mask)
        return cache[i]

    def preload(self) -> None:
        for i in range(len(self)):
            self.load(i)


def open_prepared(root, fold: int, split: str, convention: str | None = None, *, dataset: str | None = None,
                  cache: bool = False) -> PreparedDataset:
    """A fold's prepared list (``train``: base classes, ``val``: novel classes).

    ``cache``: decoded images and masks are kept in memory, for small datasets such as the
    synthetic benchmark (``preload()`` decodes them all at once, before DataLoader workers
    are forked, so that the workers share them instead of each decoding its own copy).
    """
    data = (CachedPreparedDataset if cache else PreparedDataset)(root, fold, split, convention)
    if dataset is not None and data.dataset != dataset:
        raise DataError(
            f"{root} holds the {data.dataset} dataset, not {dataset}; point data.root at a prepared {dataset} directory."
        )
    return data
