"""Datasets (PASCAL-5i, COCO-20i, the synthetic benchmark), episodes, transforms."""
