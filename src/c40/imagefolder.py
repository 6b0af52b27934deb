"""Users' own images: the one image reader (`open_image`), the one conversion to the models'
32x32 RGB input (`to_input`), and image folders `<split_root>/<class>/*.png|jpg` as datasets."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from c40.data import IMAGE_SUFFIXES, Dataset
from c40.errors import DataError

SIZE = 32  # the models' input side in pixels


def open_image(path) -> "PIL.Image.Image":  # noqa: F821
    """Read any image PIL understands; a one-line DataError otherwise."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def to_input(image) -> tuple[np.ndarray, str | None]:
    """PIL image -> ((32, 32, 3) uint8, note) where note says what was converted, if anything."""
    from PIL import Image

    notes = []
    if image.mode != "RGB":
        notes.append(f"converted from {image.mode} to RGB")
        image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        notes.append(f"resized from {image.size[0]}x{image.size[1]} to {SIZE}x{SIZE}")
        image = image.resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8), "; ".join(notes) or None


def load_image_folder(split_root: str | Path) -> Dataset:
    """Class subfolders sorted by name give the label order. Training data is not converted
    silently: an image that is not 32x32 RGB is an error naming the file and what to do."""
    split_root = Path(split_root)
    classes = sorted(p.name for p in split_root.iterdir() if p.is_dir()) if split_root.is_dir() else []
    if not classes:
        raise DataError(f"{split_root}: no class subfolders found")
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((split_root / name).iterdir()):
            if f.is_file():
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    raise DataError(f"{f}: not an image file (expected {sorted(IMAGE_SUFFIXES)})")
                array, converted = to_input(open_image(f))
                if converted:
                    raise DataError(f"{f}: would need to be {converted} (expected {SIZE}x{SIZE} "
                                    "RGB: convert your images first)")
                images.append(array)
                labels.append(label)
    if not images:
        raise DataError(f"{split_root}: no images found in the class folders")
    return Dataset(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(classes))
