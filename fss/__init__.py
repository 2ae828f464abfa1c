"""Few-shot semantic segmentation science library."""
