"""The contract every few-shot segmentation method follows.

Inputs (all methods, 1-way):

* ``support_images``: float ``[B, K, 3, H, W]``, ImageNet-normalised.
* ``support_masks``: long ``[B, K, H, W]`` with values 0, 1 and 255 (ignore / padding).
  Foreground is ``mask == 1``; 255 counts as background for prototypes unless a method's
  paper says otherwise.
* ``query_images``: float ``[B, 3, H, W]``.

N-way episodes (PANet) add a way axis: ``support_images [B, N, K, 3, H, W]`` and
``support_masks [B, N, K, H, W]``; logits then have N+1 channels ``[bg, fg_1..fg_N]``.

Training input is a batch dict (see :data:`BATCH_KEYS`); in training mode
``model(batch)`` returns :class:`ModelOutput` with the logits and the named loss terms
(``losses["loss"]`` is the total to back-propagate, the others are the terms it is made
of, for logging). In eval mode ``model(batch)`` returns logits only, and
:meth:`FSSModel.predict` is the one public inference call. Training-only branches are
not run at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fss.models.blocks import cross_entropy_ignore

#: Keys of a training/evaluation batch as produced by ``fss.data.episodes`` after collation.
BATCH_KEYS = {
    "support_images": "float [B,K,3,H,W] (N-way: [B,N,K,3,H,W])",
    "support_masks": "long [B,K,H,W] in {0,1,255} (N-way: [B,N,K,H,W])",
    "query_images": "float [B,3,H,W]",
    "query_masks": "long [B,H,W]: 1 target class, 0 background, 255 ignore (N-way: 0..N)",
    "query_base_masks": "long [B,H,W]: 1 on any training-subset class present, 0 elsewhere, 255 ignore",
    "class_ids": "long [B] (N-way: [B,N]) 1-based dataset class ids",
}


@dataclass
class ModelOutput:
    """What a method returns in training mode."""

    logits: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        return self.losses["loss"]


class FSSModel(nn.Module):
    """Base class: subclasses implement :meth:`forward_train` and :meth:`forward_infer`."""

    method_name: str = "?"
    #: True for a method with nothing to learn (``prototype``): ``fss train`` runs 0 steps.
    #: The registry's one source of the fact (``MethodSpec.training_free``).
    training_free: bool = False

    def __init__(self, *, fg_weight: float) -> None:
        """``fg_weight``: weight of foreground pixels in the segmentation CE (``train.fg_weight``,
        passed by :func:`fss.models.registry.create_model`; 1 = the papers' plain CE)."""
        super().__init__()
        self.fg_weight = float(fg_weight)

    def segmentation_ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Segmentation cross-entropy (ignore 255) with this model's foreground weight; at 1
        it is exactly the references' ``F.cross_entropy(..., ignore_index=255)``."""
        if self.fg_weight == 1.0:
            return torch.nn.functional.cross_entropy(logits.float(), target.long(), ignore_index=255)
        return cross_entropy_ignore(logits, target, fg_weight=self.fg_weight)

    def forward(self, batch: dict[str, torch.Tensor]):
        if self.training:
            return self.forward_train(batch)
        return self.forward_infer(
            batch["support_images"], batch["support_masks"], batch["query_images"]
        )

    def forward_train(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        raise NotImplementedError

    def forward_infer(
        self,
        support_images: torch.Tensor,
        support_masks: torch.Tensor,
        query_images: torch.Tensor,
    ) -> torch.Tensor:
        raise NotImplementedError

    def predict(
        self,
        support_images: torch.Tensor,
        support_masks: torch.Tensor,
        query_images: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``[B, 2, H, W]`` (N-way: ``[B, N+1, H, W]``) at the query's resolution."""
        return self.forward_infer(support_images, support_masks, query_images)

    def set_train_progress(self, fraction: float) -> None:
        """Called by the training loop before every step with ``iteration / total_iterations``,
        for methods whose training follows the schedule (SimPropNet's ICA); nothing by default."""

    def trainable_parameters(self):
        """Parameters the optimiser updates (frozen backbone parts excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def frozen_features(self, tag: str, compute, *key_inputs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The one hook for backbone calls: ``compute(rows)`` -> tuple of ``[N, ...]`` tensors.

        ``compute`` gets ``slice(None)`` (every row) or a row-index tensor and must return
        outputs that depend only on the backbone's weights and the given rows of
        ``key_inputs`` (the images, plus e.g. a resized support mask; None entries allowed).
        Without an evaluation cache (``FeatureCache.attached``), in training mode or with
        gradients enabled this is exactly ``compute(slice(None))``; otherwise rows are
        served from / stored in the cache (see :mod:`fss.models.feature_cache`).
        """
        binding = self.__dict__.get("_feature_cache_binding")
        if binding is None or self.training or torch.is_grad_enabled():
            return tuple(compute(slice(None)))
        return binding.run(tag, compute, key_inputs)
