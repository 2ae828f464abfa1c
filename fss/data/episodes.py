"""Few-shot episodes: specs, training and test samplers, the episode dataset and its collate
function (protocol section 3).

An episode is an :class:`EpisodeSpec`: the query's record index, N class ids and, per class,
K support record indices (positions in ``PreparedDataset.records``). Samplers turn an
episode index into a spec; :class:`EpisodeDataset` loads and transforms it.

Reproducibility: every random draw of episode ``i`` comes from a numpy ``Generator``
seeded by ``SeedSequence([seed, stream, (epoch,) i])`` (streams: 0 the episode spec,
1 the augmentation, 2 weak support annotations; training adds the epoch), never from a
global RNG, so the same seed gives the same episodes and augmentations whatever the number
of DataLoader workers or the order of access. The reference codebases use global RNGs
and do not have this property; their episode *distributions* are what is reproduced.

Test samplings (``sampling``):

* ``list_order`` (pfenet, bam): episode i's query is record ``i % len``; its class is
  uniform among the novel classes PRESENT in it; K supports uniform without replacement
  from the class's index, != query.
* ``pairs`` (hsnet PASCAL): episode i is the ``i % P``-th (image, class) pair, pairs
  enumerating each record's COUNTED classes in list order; supports as above.
* ``class_uniform`` (hsnet COCO, canet): class uniform among the split's classes, query
  uniform in the class's index, supports as above.
* ``panet``: class uniform, then K+1 distinct images of it; the first is the query.
  N-way (PANet Table 3): N distinct classes uniformly; the query and the first class's K
  supports are K+1 distinct images of the first class; class j's K supports are distinct
  images of class j. PANet's reference (``PairedDataset`` + ``fewShot``) fixes, once per
  run, which way's images hold the query (``cnt_query`` drawn at construction) and draws
  the ways as a random sample, so "the query holds the first (randomly drawn) class" has the
  same distribution. The reference does not keep other ways' supports apart from the query;
  here they are (``exclude_query_from_other_ways=True``; False = reference behaviour).

Masks (pfenet): the binary mask for target c is 1 where label == c, 255 where label == 255,
0 elsewhere (other classes, including novel ones in base training). N-way query labels are
0 background, j for the j-th class (1-based), 255 ignore.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from fss.data.classes import IGNORE_INDEX
from fss.data.imageio import read_mask
from fss.data.prepared import PreparedDataset
from fss.data.scoring import pad_label_square
from fss.data.transforms import EpisodeTransform, TestTransform
from fss.errors import ConfigError, DataError

TEST_SAMPLINGS = ("list_order", "pairs", "class_uniform", "panet")
TRAIN_SAMPLINGS = ("pfenet", "panet")
SUPPORT_ANNOTATIONS = ("dense", "bbox", "scribble")

#: support-mask value for pixels of ANOTHER class of the same N-way episode (PANet's
#: reference leaves them out of the support background; ``fss.models.methods.panet`` reads it)
OTHER_EPISODE_CLASS = 2

STREAM_EPISODE = 0
STREAM_AUGMENT = 1
STREAM_ANNOTATION = 2
STREAM_ORDER = 3


def episode_rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    """The generator of one (seed, stream, index...) key: PCG64(SeedSequence(key))."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(stream), *map(int, index)])))


def spawn_rngs(count: int, seed: int, stream: int, *index: int) -> list[np.random.Generator]:
    """``count`` independent generators derived from one key (one per episode image)."""
    children = np.random.SeedSequence([int(seed), int(stream), *map(int, index)]).spawn(count)
    return [np.random.Generator(np.random.PCG64(c)) for c in children]


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode: query record index, class ids (N) and support record indices [N][K]."""

    query: int
    class_ids: tuple[int, ...]
    supports: tuple[tuple[int, ...], ...]

    @property
    def ways(self) -> int:
        return len(self.class_ids)

    @property
    def shot(self) -> int:
        return len(self.supports[0])


# ---------------------------------------------------------------- masks


def binary_mask(label: np.ndarray, class_id: int) -> np.ndarray:
    """pfenet target mask: 1 where label == c, 255 where label == 255, 0 elsewhere."""
    out = np.zeros_like(label, dtype=np.uint8)
    out[label == class_id] = 1
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


def episode_label(label: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """N-way label: j (1-based) where label == class_ids[j-1], 255 ignore, 0 elsewhere."""
    out = np.zeros_like(label, dtype=np.uint8)
    for j, c in enumerate(class_ids):
        out[label == c] = j + 1
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


def base_class_mask(label: np.ndarray, base_classes: Sequence[int]) -> np.ndarray:
    """1 on any base (training-subset) class, 255 on ignore, 0 elsewhere (CELP needs it)."""
    out = np.isin(label, np.asarray(list(base_classes), dtype=label.dtype)).astype(np.uint8)
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


# ---------------------------------------------------------------- checks and draws


def _check_shot_ways(shot: int, ways: int) -> None:
    if not isinstance(shot, int) or shot < 1:
        raise ConfigError(f"shot {shot!r} must be a positive integer.")
    if not isinstance(ways, int) or ways < 1:
        raise ConfigError(f"ways {ways!r} must be a positive integer.")


def check_support_pools(data: PreparedDataset, classes: Sequence[int], shot: int) -> None:
    """Every class an episode may target needs K+1 indexed images (query + K supports)."""
    for c in sorted(classes):
        n = len(data.class_index.get(c, ()))
        if n < shot + 1:
            raise DataError(
                f"class {c} of fold {data.fold} has {n} images; {shot}-shot needs {shot + 1}; lower --shot."
            )


def _draw_without(rng: np.random.Generator, pool: Sequence[int], k: int, exclude=()) -> tuple[int, ...]:
    """``k`` distinct members of ``pool`` not in ``exclude``, uniformly, in draw order."""
    candidates = [i for i in pool if i not in exclude]
    picks = rng.choice(len(candidates), size=k, replace=False)
    return tuple(int(candidates[j]) for j in picks)


def _present_classes(data: PreparedDataset) -> list[int]:
    split = set(data.classes)
    return sorted({c for r in data.records for c in r.present if c in split})


def _nway_episode(data: PreparedDataset, rng: np.random.Generator, classes: Sequence[int],
                  shot: int, ways: int, exclude_query_from_other_ways: bool) -> EpisodeSpec:
    """panet sampling: N distinct classes; K+1 distinct images of the first (query first)."""
    chosen = [int(classes[j]) for j in rng.choice(len(classes), size=ways, replace=False)]
    first = _draw_without(rng, data.class_index[chosen[0]], shot + 1)
    query, supports = first[0], [first[1:]]
    for c in chosen[1:]:
        exclude = (query,) if exclude_query_from_other_ways else ()
        supports.append(_draw_without(rng, data.class_index[c], shot, exclude))
    return EpisodeSpec(query, tuple(chosen), tuple(supports))


# ---------------------------------------------------------------- test sampler


class TestEpisodeSampler:
    """Test episodes of one sampling rule: ``spec(i)`` depends only on (seed, i)."""

    __test__ = False  # not a pytest class

    def __init__(self, data: PreparedDataset, sampling: str, seed: int, shot: int, ways: int = 1,
                 exclude_query_from_other_ways: bool = True):
        if sampling not in TEST_SAMPLINGS:
            raise ConfigError(f"unknown test sampling {sampling!r}; choose one of: {', '.join(TEST_SAMPLINGS)}.")
        _check_shot_ways(shot, ways)
        if ways > 1 and sampling != "panet":
            raise ConfigError(f"{ways}-way episodes need sampling 'panet', not {sampling!r}.")
        self.data, self.sampling, self.seed = data, sampling, int(seed)
        self.shot, self.ways = shot, ways
        self.exclude_query_from_other_ways = exclude_query_from_other_ways
        if sampling == "list_order":
            drawable = _present_classes(data)
        elif sampling == "pairs":
            self.pairs = [(i, c) for i, r in enumerate(data.records) for c in r.counted]
            drawable = sorted({c for _, c in self.pairs})
        else:
            drawable = list(data.classes)
        if ways > len(drawable):
            raise ConfigError(
                f"{ways}-way episodes need {ways} classes but fold {data.fold} ({data.split}) has {len(drawable)}; lower --ways."
            )
        check_support_pools(data, drawable, shot)
        self.classes = drawable

    def spec(self, index: int) -> EpisodeSpec:
        rng = episode_rng(self.seed, STREAM_EPISODE, index)
        data, shot = self.data, self.shot
        if self.sampling == "list_order":
            query = index % len(data.records)
            present = [c for c in data.records[query].present if c in data.class_index]
            c = int(present[rng.integers(len(present))])
        elif self.sampling == "pairs":
            query, c = self.pairs[index % len(self.pairs)]
        elif self.sampling == "class_uniform":
            c = int(self.classes[rng.integers(len(self.classes))])
            pool = data.class_index[c]
            query = int(pool[rng.integers(len(pool))])
        else:
            return _nway_episode(data, rng, self.classes, shot, self.ways,
                                 self.exclude_query_from_other_ways)
        supports = _draw_without(rng, data.class_index[c], shot, exclude=(query,))
        return EpisodeSpec(int(query), (int(c),), (supports,))

    def specs(self, episodes: int) -> list[EpisodeSpec]:
        return [self.spec(i) for i in range(episodes)]


def build_test_episodes(data: PreparedDataset, *, sampling: str, episodes: int, seed: int, shot: int,
                        ways: int = 1, exclude_query_from_other_ways: bool = True) -> list[EpisodeSpec]:
    """The ``episodes`` test episodes of one run."""
    return TestEpisodeSampler(data, sampling, seed, shot, ways, exclude_query_from_other_ways).specs(episodes)


def episode_class_counts(specs: Sequence[EpisodeSpec]) -> dict[int, int]:
    """Episodes per class (every class of an N-way episode counts), sorted by class id."""
    counts = Counter(c for s in specs for c in s.class_ids)
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------- training sampler


class TrainEpisodeSampler:
    """Training episodes; ``spec(epoch, i)`` depends only on (seed, epoch, i).

    ``pfenet`` (1-way): each epoch walks the training list in a shuffled order (one
    permutation per (seed, epoch)); the query's class is uniform among the base classes
    present in it, K supports from the class's index, != query. ``panet``: every episode
    is drawn as the panet test sampling (N-way allowed), ``episodes_per_epoch`` of them
    (default: the list length).
    """

    def __init__(self, data: PreparedDataset, shot: int, seed: int, ways: int = 1,
                 sampling: str = "pfenet", episodes_per_epoch: int | None = None,
                 exclude_query_from_other_ways: bool = True):
        if sampling not in TRAIN_SAMPLINGS:
            raise ConfigError(f"unknown train sampling {sampling!r}; choose one of: {', '.join(TRAIN_SAMPLINGS)}.")
        _check_shot_ways(shot, ways)
        if ways > 1 and sampling != "panet":
            raise ConfigError(f"{ways}-way training needs sampling 'panet', not {sampling!r}.")
        self.data, self.shot, self.ways, self.seed, self.sampling = data, shot, ways, int(seed), sampling
        self.exclude_query_from_other_ways = exclude_query_from_other_ways
        if sampling == "pfenet":
            if episodes_per_epoch not in (None, len(data.records)):
                raise ConfigError("pfenet training visits every list image once per epoch; leave episodes_per_epoch unset.")
            self.classes = _present_classes(data)
            self.length = len(data.records)
        else:
            self.classes = list(data.classes)
            if ways > len(self.classes):
                raise ConfigError(f"{ways}-way training needs {ways} classes; fold {data.fold} has {len(self.classes)}.")
            self.length = int(episodes_per_epoch or len(data.records))
        check_support_pools(data, self.classes, shot)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    def order(self, epoch: int) -> np.ndarray:
        """The shuffled list order of ``epoch`` (pfenet), cached for the latest epoch."""
        epoch = int(epoch)
        if epoch not in self._orders:
            self._orders = {epoch: episode_rng(self.seed, STREAM_ORDER, epoch).permutation(len(self.data.records))}
        return self._orders[epoch]

    def spec(self, epoch: int, index: int) -> EpisodeSpec:
        rng = episode_rng(self.seed, STREAM_EPISODE, epoch, index)
        if self.sampling == "panet":
            return _nway_episode(self.data, rng, self.classes, self.shot, self.ways,
                                 self.exclude_query_from_other_ways)
        query = int(self.order(epoch)[index])
        present = [c for c in self.data.records[query].present if c in self.data.class_index]
        c = int(present[rng.integers(len(present))])
        supports = _draw_without(rng, self.data.class_index[c], self.shot, exclude=(query,))
        return EpisodeSpec(query, (c,), (supports,))


# ---------------------------------------------------------------- the dataset


def load_instance_map(data: PreparedDataset, record: int) -> np.ndarray | None:
    """Record ``record``'s instance map (meta ``instance_dir``/<id>.png), or None when the
    dataset has no instance masks or none for this image."""
    instance_dir = data.meta.get("instance_dir")
    if not instance_dir:
        return None
    directory = Path(instance_dir)
    path = (directory if directory.is_absolute() else data.root / directory) / f"{data.records[record].id}.png"
    if not path.is_file():
        return None
    return read_mask(path)


def _weak_support_mask(kind: str, binary: np.ndarray, data: PreparedDataset, record: int,
                       class_id: int, rng: np.random.Generator, unlabelled: int) -> np.ndarray:
    """Replace a dense support mask by a bbox or scribble one (fss.data.weak, PANet Table 6)."""
    try:
        from fss.data import weak  # optional: scipy, for weak annotations only
    except ImportError:
        raise ConfigError(
            f"support_annotation={kind!r} needs fss/data/weak.py, which is not installed; use 'dense'."
        ) from None
    instance_map = load_instance_map(data, record)
    out = weak.weak_support_mask(kind, binary, instance_map, class_id, rng, unlabelled=unlabelled)
    return np.asarray(out, dtype=np.uint8)


class TestImageCache:
    """Test images decoded, resized and normalised once, with their labels, for every episode,
    shot and support control that uses them (``fss evaluate``; identical samples, tested).

    A test transform is deterministic, and nearest resizing commutes with the per-pixel maps
    that make an episode's masks from a label (its class, the base classes, another class of
    an N-way episode, 255 kept): so the label is resized once and each episode's masks come
    from it. An entry holds the normalised image (``3 x S x S`` float32: 2.7 MB at S = 473, 4.9
    MB at 641), the resized label and the original label (uint8); least recently used entries
    go beyond ``max_mb``. A DataLoader worker has its own (empty) copy.
    """

    __test__ = False  # not a pytest class

    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * (1 << 20))
        self.entries: OrderedDict = OrderedDict()
        self.bytes = self.hits = self.misses = self.evictions = 0

    def get(self, data: PreparedDataset, record: int, transform) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(normalised image, resized label, original label) of ``record`` under ``transform``."""
        key = (str(data.root), data.fold, data.split, record, repr(sorted(transform.describe().items())))
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        image, label = data.load(record)
        image_t, resized = transform(image, label[None], None, "test")
        entry = (image_t, resized[0].numpy().astype(np.uint8), np.asarray(label, dtype=np.uint8))
        size = image_t.numel() * image_t.element_size() + entry[1].nbytes + entry[2].nbytes
        if size <= self.max_bytes:
            self.entries[key] = entry
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old[0].numel() * old[0].element_size() + old[1].nbytes + old[2].nbytes
                self.evictions += 1
        return entry

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "entries": len(self.entries), "mb": round(self.bytes / (1 << 20), 1),
                "max_mb": round(self.max_bytes / (1 << 20), 1)}


class EpisodeDataset(Dataset):
    """Episodes of a prepared dataset as model-ready samples.

    ``episodes`` is a list of :class:`EpisodeSpec` (test) or a :class:`TrainEpisodeSampler`
    (training; call :meth:`set_epoch` before each epoch, and create the DataLoader's
    workers afresh each epoch, i.e. ``persistent_workers=False``, so they see it).
    ``seed`` keys the augmentation / annotation streams (use the protocol's run seed for
    test episodes, the training seed for training).

    A sample holds the per-episode versions of :data:`fss.models.base.BATCH_KEYS`
    (``support_images [K,3,S,S]``, ``support_masks [K,S,S]``, ``query_images [3,S,S]``,
    ``query_masks [S,S]``, ``query_base_masks [S,S]``, ``class_ids`` scalar; N-way:
    ``[N,K,...]`` and ``class_ids [N]``), ``episode_index``, and
    with ``keep_original`` (default for test episodes) ``query_label_original`` (the
    query's target label at original resolution, 0/1/255 or N-way 0..N/255, int64 ``[h,w]``) and
    ``original_size`` (int64 ``[2]`` = h, w). Batch with :func:`collate_episodes`.

    ``other_episode_class``: in N-way episodes a support mask holds this value (default
    :data:`OTHER_EPISODE_CLASS` = 2) on the pixels of the episode's OTHER classes, as PANet's
    reference keeps them out of the support background; None leaves them 0 (background).
    1-way masks are always 0/1/255.

    ``support_annotation``: ``dense`` (default) or ``bbox`` / ``scribble`` (PANet Table 6,
    test only): each support's binary mask is replaced, at original resolution and before
    the transform, by ``fss.data.weak.weak_support_mask`` (with the dataset's instance map
    when meta ``instance_dir`` has one for the image); pixels that are neither foreground
    nor background get ``weak_unlabelled`` (default 255; models that count 255 as
    background, like PANet, need 2 = :data:`OTHER_EPISODE_CLASS`).
    """

    def __init__(self, data: PreparedDataset, episodes, transform: EpisodeTransform, *,
                 seed: int = 0, epoch: int = 0, support_annotation: str = "dense",
                 keep_original: bool | None = None, other_episode_class: int | None = OTHER_EPISODE_CLASS,
                 weak_unlabelled: int = IGNORE_INDEX, image_cache: TestImageCache | None = None):
        if support_annotation not in SUPPORT_ANNOTATIONS:
            raise ConfigError(
                f"unknown support annotation {support_annotation!r}; choose one of: {', '.join(SUPPORT_ANNOTATIONS)}."
            )
        self.data = data
        self.training = isinstance(episodes, TrainEpisodeSampler)
        self.sampler = episodes if self.training else None
        self.specs = None if self.training else list(episodes)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.support_annotation = support_annotation
        self.other_episode_class = other_episode_class
        self.weak_unlabelled = int(weak_unlabelled)
        self.keep_original = (not self.training) if keep_original is None else bool(keep_original)
        # only a deterministic test transform of dense annotations can be computed once per image
        once = not self.training and support_annotation == "dense" and isinstance(transform, TestTransform)
        self.image_cache = image_cache if once else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sampler) if self.training else len(self.specs)

    def spec(self, index: int) -> EpisodeSpec:
        if self.training:
            return self.sampler.spec(self.epoch, index)
        return self.specs[index]

    def class_counts(self) -> dict[int, int]:
        """Episodes per class (test episode lists; the current epoch for training)."""
        return episode_class_counts([self.spec(i) for i in range(len(self))])

    def _key(self, index: int) -> tuple[int, ...]:
        return (self.epoch, index) if self.training else (index,)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        spec = self.spec(index)
        ways, shot = spec.ways, spec.shot
        key = self._key(index)
        aug_rngs = spawn_rngs(1 + ways * shot, self.seed, STREAM_AUGMENT, *key)
        ann_rngs = (spawn_rngs(ways * shot, self.seed, STREAM_ANNOTATION, *key)
                    if self.support_annotation != "dense" else None)

        q_img, q_masks, target, label_shape = self._query(spec, aug_rngs[0])
        s_imgs, s_masks = [], []
        for w, c in enumerate(spec.class_ids):
            others = [o for o in spec.class_ids if o != c]
            for k, record in enumerate(spec.supports[w]):
                img, mask = self._support(record, c, others, aug_rngs[1 + w * shot + k],
                                          None if ann_rngs is None else ann_rngs[w * shot + k])
                s_imgs.append(img)
                s_masks.append(mask)

        if len({tuple(t.shape) for t in s_imgs}) > 1:
            raise ConfigError(
                f"episode {index}'s supports come out in different sizes with transform "
                f"{getattr(self.transform, 'name', '?')!r}; use a transform that resizes (e.g. a test resize mode)."
            )
        sample = {
            "support_images": torch.stack(s_imgs),
            "support_masks": torch.stack(s_masks),
            "query_images": q_img,
            "query_masks": q_masks[0],
            "query_base_masks": q_masks[1],
            "class_ids": torch.tensor(spec.class_ids[0] if ways == 1 else spec.class_ids, dtype=torch.long),
            "episode_index": torch.tensor(index, dtype=torch.long),
        }
        if ways > 1:
            shape = (ways, shot)
            sample["support_images"] = sample["support_images"].view(*shape, *s_imgs[0].shape)
            sample["support_masks"] = sample["support_masks"].view(*shape, *s_masks[0].shape)
        if self.keep_original:
            sample["query_label_original"] = torch.from_numpy(target).long()
            sample["original_size"] = torch.tensor(label_shape, dtype=torch.long)
        return sample

    def _query_masks(self, label: np.ndarray, class_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        target = binary_mask(label, class_ids[0]) if len(class_ids) == 1 else episode_label(label, class_ids)
        return target, base_class_mask(label, self.data.base_classes)

    def _query(self, spec: EpisodeSpec, rng) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, tuple]:
        """(image, [target, base] masks, target at original resolution, original size) of the query."""
        if self.image_cache is not None:
            q_img, resized, label = self.image_cache.get(self.data, spec.query, self.transform)
            target = self._query_masks(label, spec.class_ids)[0]
            return q_img, torch.from_numpy(np.stack(self._query_masks(resized, spec.class_ids))).long(), target, label.shape
        image, label = self.data.load(spec.query)
        target, base = self._query_masks(label, spec.class_ids)
        q_img, q_masks = self.transform(image, np.stack([target, base]), rng, "query")
        return q_img, q_masks, target, label.shape

    def _support(self, record: int, class_id: int, others: list[int], rng, ann_rng) -> tuple[torch.Tensor, torch.Tensor]:
        """One support's image and mask (1 on ``class_id``; N-way: ``others`` marked)."""
        if self.image_cache is not None:
            img, label, _ = self.image_cache.get(self.data, record, self.transform)
        else:
            s_image, label = self.data.load(record)
        mask = binary_mask(label, class_id)
        if ann_rng is not None:
            mask = _weak_support_mask(self.support_annotation, mask, self.data, record, class_id, ann_rng,
                                      self.weak_unlabelled)
        elif others and self.other_episode_class is not None:
            mask[np.isin(label, others)] = self.other_episode_class
        if self.image_cache is not None:
            return img, torch.from_numpy(mask).long()
        img, masks = self.transform(s_image, mask[None], rng, "support")
        return img, masks[0]


def collate_episodes(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack episode samples; ``query_label_original`` (sizes differ per image) is padded
    bottom/right with 255 to the batch's largest square ``[B, L, L]``, so element b's
    original label is ``[:h_b, :w_b]`` and its pfenet target ``[:L_b, :L_b]``
    (L_b = max(h_b, w_b)); see :func:`fss.data.scoring.original_resolution_pairs`.
    Batch size 1 is the simplest for original-resolution scoring."""
    out: dict[str, torch.Tensor] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "query_label_original":
            side = max(max(v.shape) for v in values)
            out[key] = torch.stack([pad_label_square(v, side) for v in values])
        else:
            out[key] = default_collate(values)
    return out


# A worker's batch under this size goes back to the main process through the pipe as numpy
# arrays. Tensors would go through shared memory, one file descriptor per tensor, each
# fetched over its own socket round trip to the worker (about 1.5 ms per tensor on the 2-core
# machine, 10 ms per batch of the embedded benchmark, where copying its 0.3 MB costs
# microseconds); larger batches, and pinned ones (CUDA), keep shared memory.
PIPE_BATCH_BYTES = 4 << 20


class EpisodeLoader:
    """A DataLoader of episodes (``collate_episodes``) whose worker batches under
    :data:`PIPE_BATCH_BYTES` travel as numpy arrays and come out as tensors again (same
    values). Iterating it starts the workers, as a DataLoader does; ``len`` is the loader's."""

    def __init__(self, dataset, *, num_workers: int, pin: bool, **kwargs) -> None:
        self.by_pipe = num_workers > 0 and not pin
        self.loader = DataLoader(dataset, num_workers=num_workers, pin_memory=pin,
                                 collate_fn=collate_small_as_arrays if self.by_pipe else collate_episodes, **kwargs)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if not self.by_pipe:
            return iter(self.loader)
        return (arrays_to_tensors(batch) for batch in self.loader)


def collate_small_as_arrays(samples) -> dict:
    """``collate_episodes``, then, for a batch under :data:`PIPE_BATCH_BYTES`, its tensors as
    numpy arrays (what :func:`arrays_to_tensors` turns back)."""
    batch = collate_episodes(samples)
    size = sum(v.numel() * v.element_size() for v in batch.values() if hasattr(v, "numel"))
    if size > PIPE_BATCH_BYTES:
        return batch
    return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in batch.items()}


def arrays_to_tensors(batch: dict) -> dict:
    return {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in batch.items()}
