"""CANet (Zhang et al., CVPR 2019): dense comparison + iterative optimisation (baseline).

Pipeline (reference code ``icoz69/CaNet``, ``one_shot_network.py``):

1. frozen backbone up to ``layer3`` (dilated, output stride 8);
2. ``extract_features``: concat(layer2, layer3) -> 3x3 conv, dilation 2 -> 256 + ReLU +
   Dropout2d(0.5) (knob ``feature_dropout``), shared by support and query;
3. ``support_prototype``: masked average pooling of the support feature with the support
   mask resized bilinearly (align_corners=True) to the feature size, eps 5e-4; K shots are
   averaged (CANet's attention-based K-shot fusion is not part of the reference code and is
   not implemented: prototype averaging, as protocol section 7);
4. ``dense_comparison``: tile the prototype, concat with the query feature, 3x3 conv
   (dilation 2) -> 256 + ReLU + Dropout2d(0.5) (the same knob);
5. ``iom_decode``: the iterative optimisation module's three residual blocks, the first one
   taking the previous prediction's softmax (2 channels) as extra input, then the ASPP-like
   head (:class:`fss.models.blocks.ASPPHead`) -> 2 logits at 1/8;
6. logits upsampled bilinearly (align_corners=True) to the label size; CE ignore 255.

At test time the decoder is run ``iom_iterations`` times, each pass feeding back the
previous softmax (the first pass gets an all-zero history mask).

**Training history mask (difference from the reference).** The reference stores every
training sample's last prediction and feeds it back, with probability 0.3, the next time the
sample is drawn. Batches here carry no sample identity, so the default ``history_mode =
"in_forward"`` emulates it inside one forward: ``train_history_steps`` no-grad decoder
passes are run first; after each, every sample keeps the (detached) softmax as its history
with probability ``history_prob`` (else zeros); the final pass, with gradients, uses that
history. ``history_mode = "zeros"`` trains with an all-zero history only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fss.errors import ConfigError
from fss.models.backbones import build_backbone
from fss.models.base import FSSModel, ModelOutput
from fss.models.blocks import CANET_MAP_EPS, ASPPHead, masked_average_pool
from fss.models.registry import Knob, register_method

IGNORE_INDEX = 255

CANET_BACKBONES = ("resnet50", "resnet101", "resnet50v2", "resnet101v2", "small")

CANET_KNOBS = {
    "channels": Knob(
        256, int, low=4, high=2048, small=16,
        help="width of the reduced features, dense comparison, IOM and ASPP head (reference 256; "
        "the embedded synthetic benchmark uses 64)",
    ),
    "iom_iterations": Knob(
        4, int, low=1, high=10, test_time=True,
        help="decoder passes at test time, each feeding back the previous softmax (first pass: "
        "zero history); default 4 (CANet paper)",
    ),
    "history_mode": Knob(
        "in_forward", str, choices=("in_forward", "zeros"),
        help="training history mask: in_forward (default) = no-grad decoder pass(es) inside the "
        "forward whose softmax is kept per sample with probability history_prob (the reference "
        "stores the last prediction per sample instead); zeros = always an empty history",
    ),
    "history_prob": Knob(
        0.3, float, low=0.0, high=1.0,
        help="probability that a training sample gets its previous prediction as history "
        "(reference: 0.3)",
    ),
    "train_history_steps": Knob(
        1, int, low=1, high=5,
        help="no-grad decoder passes that build the training history mask (history_mode "
        "in_forward); default 1",
    ),
    "feature_dropout": Knob(
        0.5, float, low=0.0, high=0.9,
        help="Dropout2d probability after the shared feature layer (applied to support and query "
        "separately) and after the dense comparison (reference 0.5 for both)",
    ),
    "backbone_bn_train": Knob(
        False, bool,
        help="compatibility: keep the frozen backbone's BatchNorm in train mode (batch "
        "statistics) as the reference code does; default False = eval mode",
    ),
}


def _resize(x: torch.Tensor, size, align_corners: bool = True) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def _conv_relu_dropout(cin: int, cout: int, dropout: float, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=True),
        nn.ReLU(inplace=True),
        nn.Dropout2d(p=dropout),
    )


class IOMResidualBlock(nn.Module):
    """One residual block of CANet's IOM: ``x + conv(relu(conv(relu(input))))``.

    The first block's input is ``concat(x, history)`` (Eq. ``M_t = x + F(x, y_{t-1})``).
    """

    def __init__(self, in_channels: int, channels: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=True),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=True),
        )

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        inp = x if extra is None else torch.cat([x, extra], dim=1)
        return x + self.body(inp)


def _split_episode(support_images: torch.Tensor, support_masks: torch.Tensor, method: str):
    """Validate 1-way inputs ``[B,K,3,H,W]`` / ``[B,K,H,W]``."""
    if support_images.dim() != 5 or support_masks.dim() != 4:
        raise ConfigError(
            f"{method} is a 1-way method: support_images must be [B,K,3,H,W] and support_masks "
            f"[B,K,H,W], got {tuple(support_images.shape)} and {tuple(support_masks.shape)}."
        )
    return support_images, support_masks


@register_method("canet", base=None, knobs=CANET_KNOBS, backbones=CANET_BACKBONES, display="CANet")
class CANet(FSSModel):
    """CANet: dense comparison of a support prototype with the query + iterative optimisation."""

    feature_channels = 256  # the reference's width; knob ``channels``
    num_history_channels = 2

    def __init__(
        self,
        backbone: str = "resnet50",
        shot: int = 1,
        backbone_weights: str | None = None,
        *,
        iom_iterations: int,
        history_mode: str,
        history_prob: float,
        train_history_steps: int,
        backbone_bn_train: bool,
        channels: int,
        feature_dropout: float,
        fg_weight: float,
    ) -> None:
        super().__init__(fg_weight=fg_weight)
        self.feature_channels = int(channels)
        self.feature_dropout = feature_dropout
        self.shot = shot
        self.iom_iterations = iom_iterations
        self.history_mode = history_mode
        self.history_prob = history_prob
        self.train_history_steps = train_history_steps
        self.backbone_bn_train = backbone_bn_train

        net = build_backbone(backbone, weights=backbone_weights)
        # CANet uses the backbone up to layer3 only: drop layer4 (not run, not stored).
        net.layer4 = nn.Identity()
        for p in net.parameters():
            p.requires_grad_(False)
        self.backbone = net
        in_channels = net.stage_channels["layer2"] + net.stage_channels["layer3"]
        c = self.feature_channels
        self.feature_reduce = _conv_relu_dropout(in_channels, c, feature_dropout, dilation=2)  # "layer5"
        self.dense_compare = _conv_relu_dropout(2 * c, c, feature_dropout, dilation=2)  # "layer55"
        self.iom_blocks = nn.ModuleList(
            [IOMResidualBlock(c + self.num_history_channels, c), IOMResidualBlock(c, c), IOMResidualBlock(c, c)]
        )
        self.head = ASPPHead(c, channels=c, num_classes=2)
        self.train(True)

    # ----------------------------------------------------------------- mode handling
    def train(self, mode: bool = True):
        super().train(mode)
        if mode and not self.backbone_bn_train:
            self.backbone.eval()  # frozen backbone: BatchNorm with running statistics
        return self

    # ----------------------------------------------------------------- building blocks
    def backbone_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen ``layer2`` and ``layer3`` outputs (run without gradients)."""
        bb = self.backbone

        def stages(rows):
            layer2 = bb.layer2(bb.layer1(bb.layer0(images[rows])))
            return layer2, bb.layer3(layer2)

        with torch.no_grad():  # frozen_features: the evaluation feature cache hook (base.py)
            layer2, layer3 = self.frozen_features("canet.layer3", stages, images)
        return layer2, layer3

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Shared feature: concat(layer2, layer3) -> dilated 3x3 conv 256 + ReLU + Dropout."""
        layer2, layer3 = self.backbone_features(images)
        layer2 = _resize(layer2, layer3.shape[-2:])
        return self.feature_reduce(torch.cat([layer2, layer3], dim=1))

    @staticmethod
    def foreground_mask(support_masks: torch.Tensor) -> torch.Tensor:
        """Binary support mask ``(mask == 1)`` as float; 255 counts as background."""
        return (support_masks == 1).float()

    def support_prototype(self, support_feats: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
        """Mean over shots of MAP(F_s, M_s) with eps 5e-4 at feature resolution.

        ``support_feats`` ``[B,K,C,h,w]``, ``support_masks`` ``[B,K,H,W]`` -> ``[B,C]``.
        """
        b, k = support_feats.shape[:2]
        feats = support_feats.flatten(0, 1)
        mask = _resize(self.foreground_mask(support_masks).flatten(0, 1).unsqueeze(1), feats.shape[-2:])
        protos = masked_average_pool(feats, mask.to(feats.dtype), CANET_MAP_EPS)
        return protos.view(b, k, -1).mean(dim=1)

    def dense_comparison(self, query_feat: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
        """Tile the prototype over the query feature, concat, 3x3 dilated conv -> 256."""
        tiled = prototype[..., None, None].expand(-1, -1, *query_feat.shape[-2:])
        return self.dense_compare(torch.cat([query_feat, tiled], dim=1))

    def iom_decode(self, feat: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """IOM residual blocks with the history mask, then the ASPP head: logits at 1/8."""
        if history is None:
            history = feat.new_zeros(feat.shape[0], self.num_history_channels, *feat.shape[-2:])
        history = _resize(history.to(feat.dtype), feat.shape[-2:])
        out = self.iom_blocks[0](feat, history)
        for block in self.iom_blocks[1:]:
            out = block(out)
        return self.head(out)

    def iterate(self, compared: torch.Tensor, iterations: int, history: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder ``iterations`` times, feeding back the softmax; last logits."""
        logits = self.iom_decode(compared, history)
        for _ in range(iterations - 1):
            logits = self.iom_decode(compared, logits.softmax(dim=1))
        return logits

    def training_history(self, compared: torch.Tensor) -> torch.Tensor | None:
        """History mask for the graded training pass (see the module docstring)."""
        if self.history_mode == "zeros" or self.history_prob <= 0:
            return None
        history = None
        for _ in range(self.train_history_steps):
            keep = torch.rand(compared.shape[0], device=compared.device) < self.history_prob
            if not bool(keep.any()):
                history = None
                continue
            with torch.no_grad():
                probs = self.iom_decode(compared, history).softmax(dim=1)
            history = probs * keep.to(probs.dtype)[:, None, None, None]
        return history

    # ----------------------------------------------------------------- forward passes
    def encode_episode(self, support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor):
        """Features of the query ``[B,C,h,w]`` and supports ``[B,K,C,h,w]`` (one backbone call)."""
        b, k = support_images.shape[:2]
        feats = self.extract_features(torch.cat([support_images.flatten(0, 1), query_images], dim=0))
        support_feats = feats[: b * k].view(b, k, *feats.shape[1:])
        return feats[b * k :], support_feats

    def forward_train(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        support_images, support_masks = _split_episode(batch["support_images"], batch["support_masks"], self.method_name)
        query_images, query_masks = batch["query_images"], batch["query_masks"]
        query_feat, support_feats = self.encode_episode(support_images, support_masks, query_images)
        prototype = self.support_prototype(support_feats, support_masks)
        compared = self.dense_comparison(query_feat, prototype)
        logits = self.iom_decode(compared, self.training_history(compared))
        logits = _resize(logits, query_masks.shape[-2:])
        seg = self.segmentation_ce(logits, query_masks)
        return ModelOutput(logits=logits, losses={"seg": seg, "loss": seg})

    def forward_infer(self, support_images, support_masks, query_images) -> torch.Tensor:
        support_images, support_masks = _split_episode(support_images, support_masks, self.method_name)
        query_feat, support_feats = self.encode_episode(support_images, support_masks, query_images)
        prototype = self.support_prototype(support_feats, support_masks)
        compared = self.dense_comparison(query_feat, prototype)
        logits = self.iterate(compared, self.iom_iterations)
        return _resize(logits, query_images.shape[-2:])
