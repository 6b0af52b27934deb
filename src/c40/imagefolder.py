"""Users' own images: `<split_root>/<class>/*.png|jpg`, 32x32 RGB (or resized on request)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from c40.data import IMAGE_SUFFIXES, Dataset
from c40.errors import DataError

SIZE = 32


def read_image(path: Path, *, resize: bool) -> np.ndarray:
    """One image file -> (32, 32, 3) uint8; other sizes/modes are errors unless `resize`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                if not resize:
                    raise DataError(f"{path}: image mode {im.mode}, expected RGB "
                                    "(convert it to RGB first)")
                im = im.convert("RGB")
            if im.size != (SIZE, SIZE):
                if not resize:
                    raise DataError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected "
                                    f"{SIZE}x{SIZE} (resize it first)")
                im = im.resize((SIZE, SIZE), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def load_image_folder(split_root: str | Path, *, resize: bool = False) -> Dataset:
    """Class subfolders sorted by name give the label order."""
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
                images.append(read_image(f, resize=resize))
                labels.append(label)
    if not images:
        raise DataError(f"{split_root}: no images found in the class folders")
    return Dataset(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(classes))
