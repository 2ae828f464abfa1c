"""`fss prepare pascal|coco|synthetic`: turn raw datasets into the prepared format."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from fss.data.coco import prepare_coco
from fss.data.pascal import prepare_pascal
from fss.data.synthetic import prepare_synthetic
from pipeline.console import console, track

app = typer.Typer(help="Prepare a dataset: render masks, build the per-fold lists.", no_args_is_help=True)


class TrainList(str, Enum):
    pfenet = "pfenet"
    trainaug = "trainaug"


class Crowd(str, Enum):
    skip = "skip"
    include = "include"
    ignore = "ignore"


def _done(summary: dict, out: Path) -> None:
    console.print(f"[green]prepared[/green] {out}")
    typer.echo(json.dumps(summary, sort_keys=True))


@app.command("pascal")
def pascal(
    voc_root: Path = typer.Option(..., help="VOC2012 directory (JPEGImages, SegmentationClass, ImageSets/Segmentation)."),
    out: Path = typer.Option(..., help="Output directory of the prepared dataset."),
    sbd_root: Optional[Path] = typer.Option(None, help="SBD release 'dataset' directory (cls/*.mat, train.txt, val.txt); aug masks are rendered from it."),
    aug_root: Optional[Path] = typer.Option(None, help="A ready SegmentationClassAug directory (instead of --sbd-root); --train-list pfenet needs its sbd_train.txt (SBD train.txt), trainaug uses its train_aug.txt if present."),
    train_list: TrainList = typer.Option(TrainList.pfenet, help="pfenet: VOC train + SBD train - VOC val; trainaug: VOC train + SBD train + SBD val - VOC val."),
    min_area: int = typer.Option(2048, help="Small-object rule: a class counts for an image if it covers this many pixels (0 disables: panet)."),
    filter_intersection: bool = typer.Option(False, help="bam: drop training images that contain any novel class."),
) -> None:
    """PASCAL-5i from VOC2012 plus SBD (or a ready SegmentationClassAug)."""
    summary = prepare_pascal(
        voc_root, out, sbd_root=sbd_root, aug_root=aug_root, train_list=train_list.value,
        min_area=min_area, filter_intersection=filter_intersection, track=track,
    )
    _done(summary, out)


@app.command("coco")
def coco(
    coco_root: Path = typer.Option(..., help="COCO directory with train2014/, val2014/ and annotations/instances_{train,val}2014.json."),
    out: Path = typer.Option(..., help="Output directory of the prepared dataset."),
    crowd: Crowd = typer.Option(Crowd.skip, help="iscrowd annotations: skip (CELP/PFENet renderer), include (PANet), ignore (paint 255)."),
    min_area: int = typer.Option(2048, help="Small-object rule in pixels at original resolution (0 disables)."),
    filter_intersection: bool = typer.Option(False, help="bam: drop training images that contain any novel class."),
) -> None:
    """COCO-20i from the 2014 images and instance annotations (both fold conventions)."""
    summary = prepare_coco(
        coco_root, out, crowd=crowd.value, min_area=min_area,
        filter_intersection=filter_intersection, track=track,
    )
    _done(summary, out)


@app.command("synthetic")
def synthetic(
    out: Path = typer.Option(..., help="Output directory (VOC layout plus lists)."),
    seed: int = typer.Option(0, help="Generator seed: the same seed writes the same dataset."),
    size: Optional[int] = typer.Option(None, help="Image side in pixels (default: the generator's)."),
    train_images: Optional[int] = typer.Option(None, help="Number of training images (default: the generator's)."),
    val_images: Optional[int] = typer.Option(None, help="Number of val (test) images (default: the generator's)."),
    holdout_images: Optional[int] = typer.Option(None, help="Held-out validation images, in no test list (lists "
                                                 "fold<k>/holdout.txt; validation.split: holdout). Default: none."),
    min_area: Optional[int] = typer.Option(None, help="Small-object rule in pixels (default: 2048 scaled to the image area, round(2048*size^2/(500*375)))."),
) -> None:
    """The embedded synthetic benchmark (20 classes, 4 folds), written in the VOC layout."""
    kwargs = dict(size=size, train_images=train_images, val_images=val_images, holdout_images=holdout_images,
                  min_area=min_area)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    summary = prepare_synthetic(out, seed=seed, track=track, **kwargs)
    _done(summary, out)
