"""``prototype``: the training-free floor of the benchmark (no learned parameter).

Masked average pooling of the frozen backbone's support features into a foreground and a
background prototype, cosine similarity of every query feature to both, logits
``scale * [cos(q, bg), cos(q, fg)]`` (the scale only sharpens the softmax; the argmax is
the nearer prototype). Features: the chosen backbone stages (default ``layer2`` +
``layer3``, PFENet's mid-level feature), each resized bilinearly to the deepest chosen
stage's size, concatenated. The support masks are resized bilinearly to the
feature size; 255 (padding / ignore) counts as neither foreground nor background. K
shots: the mean of the per-shot prototypes. ``fss train`` runs 0 iterations for it (no
trainable parameter) and writes a run directory like any other method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fss.models.backbones import STAGES, build_backbone, chosen_stages, stage_outputs
from fss.models.base import FSSModel, ModelOutput
from fss.models.blocks import cross_entropy_ignore, masked_average_pool, resize_bilinear
from fss.models.registry import Knob, register_method

MAP_EPS = 5e-4

PROTOTYPE_KNOBS = {
    "layers": Knob(["layer2", "layer3"], list, "backbone stages whose features are concatenated "
                   "(resized to the smallest of them); default layer2,layer3", choices=STAGES, item_kind=str),
    "scale": Knob(10.0, float, "cosine scale of the logits (softmax sharpness; argmax unchanged); default 10",
                  low=0.01, high=1000.0),
}


@register_method("prototype", base=None, knobs=PROTOTYPE_KNOBS, display="prototype (floor)",
                 backbones=("small", "resnet50v2", "resnet101v2", "vgg16bn", "resnet50", "resnet101"))
class Prototype(FSSModel):
    """Training-free floor: cosine to masked-average fg/bg prototypes of frozen features."""

    #: ``fss train`` runs 0 iterations (no optimiser) and writes the run directory
    training_free = True

    def __init__(self, backbone: str = "small", shot: int = 1, backbone_weights: str | None = None, *,
                 layers: list, scale: float, fg_weight: float) -> None:
        super().__init__(fg_weight=fg_weight)
        self.shot = shot
        self.layers = chosen_stages("prototype", layers)
        self.scale = scale
        self.backbone = build_backbone(backbone, weights=backbone_weights)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen, always in eval mode
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Concatenated features of the chosen stages at the deepest chosen stage's size."""
        def stages(rows):
            return stage_outputs(self.backbone, images[rows], self.layers)

        with torch.no_grad():  # the cache key names the stage set
            feats = self.frozen_features("prototype.encode:" + ",".join(self.layers), stages, images)
        size = feats[-1].shape[-2:]
        return torch.cat([resize_bilinear(f, size) for f in feats], dim=1)

    def forward_infer(self, support_images, support_masks, query_images) -> torch.Tensor:
        batch, shots = support_masks.shape[:2]
        feats = self.encode(torch.cat([support_images.flatten(0, 1), query_images], dim=0))
        support, query = feats[: batch * shots], feats[batch * shots:]
        masks = support_masks.flatten(0, 1).unsqueeze(1)
        fg = resize_bilinear((masks == 1).to(support.dtype), support.shape[-2:])
        bg = resize_bilinear((masks == 0).to(support.dtype), support.shape[-2:])
        fg_proto = masked_average_pool(support, fg, MAP_EPS).unflatten(0, (batch, shots)).mean(dim=1)
        bg_proto = masked_average_pool(support, bg, MAP_EPS).unflatten(0, (batch, shots)).mean(dim=1)
        protos = torch.stack([bg_proto, fg_proto], dim=1)  # [B, 2, C]
        logits = F.cosine_similarity(query.unsqueeze(1), protos[..., None, None], dim=2) * self.scale
        return resize_bilinear(logits, query_images.shape[-2:])

    def forward_train(self, batch) -> ModelOutput:
        logits = self.forward_infer(batch["support_images"], batch["support_masks"], batch["query_images"])
        loss = cross_entropy_ignore(logits, batch["query_masks"])
        return ModelOutput(logits=logits, losses={"main": loss, "loss": loss})
