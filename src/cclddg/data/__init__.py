"""Data sources; for now the built-in procedural `shapes` data."""

from cclddg.data.images import image_to_tensor, make_grid, tensor_to_image
from cclddg.data.shapes import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    COLORS,
    LABEL_DIM,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSample,
    ShapesDataset,
    attrs_to_label,
    label_to_attrs,
    make_sample,
    parse_attrs,
    parse_caption,
    render,
)

__all__ = [
    "ATTRIBUTE_VALUES", "ATTRIBUTES", "COLORS", "LABEL_DIM", "PALETTE", "POSITIONS", "SHAPES", "SIZES",
    "ShapeSample", "ShapesDataset", "attrs_to_label", "label_to_attrs", "make_sample", "parse_attrs",
    "parse_caption", "render", "image_to_tensor", "make_grid", "tensor_to_image",
]
