"""The one image geometry every loader and the shard tool share.

The notebook's transform is ``Resize(64)`` (shorter side to 64, bilinear with antialiasing)
followed by ``CenterCrop(64)``. Published CelebA-64 work first crops the centre 148x148 face
region; ``crop=148`` does that. For a 178x218 CelebA image and size 64 the default keeps the
full width and rows 7..71 of the 64x78 resized image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_crop(img: Image.Image, size: int = 64, crop: int | None = None) -> Image.Image:
    """The reference transform on a PIL image (torchvision's own functions, as the notebook)."""
    # Imported here: torchvision costs ~1 s of start-up that the loaders which never call this don't need.
    from torchvision.transforms import functional as TF

    if crop is not None:
        img = TF.center_crop(img, [crop, crop])
    img = TF.resize(img, size)
    return TF.center_crop(img, [size, size])


def resize_crop_array(img: Image.Image, size: int = 64, crop: int | None = None) -> np.ndarray:
    """``resize_crop`` as a ``size x size x 3`` uint8 array (HWC, RGB): the very pixels, by the same
    PIL calls torchvision makes (tests/test_loaders.py checks every geometry), without importing
    torchvision (~1-3 s in each shard-writer process) or its overhead per call (~100 us an image)."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    w, h = img.size
    if crop is not None:
        if crop > min(w, h):  # torchvision pads: leave that to it
            return np.asarray(resize_crop(img, size, crop), dtype=np.uint8)
        top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
        img, w, h = img.crop((left, top, left + crop, top + crop)), crop, crop
    rh, rw = resized_shape(h, w, size)
    img = img.resize((rw, rh), Image.BILINEAR)
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def resized_shape(height: int, width: int, size: int = 64) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to ``size``, rounded as torchvision does."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def crop_box(height: int, width: int, size: int = 64, crop: int | None = None
             ) -> tuple[float, float, float, float]:
    """The window (x0, y0, x1, y1), in pixels of the full image, that ``resize_crop`` turns into its
    ``size x size`` output: resizing just this window to ``size x size`` samples the very same
    positions as cropping, resizing and cropping again (torchvision's rounding at each step).
    Loaders that resize a region in one step (turbo's PIL box, DALI's ROI) use it."""
    ch, cw = (crop, crop) if crop else (height, width)
    top, left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
    rh, rw = resized_shape(ch, cw, size)
    top2, left2 = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    y0, x0 = top + top2 * ch / rh, left + left2 * cw / rw
    return x0, y0, x0 + size * cw / rw, y0 + size * ch / rh


def check_geometry(height: int, width: int, size: int, crop: int | None, where: str) -> None:
    """DataError unless a ``height x width`` image can be centre-cropped to ``crop``."""
    if crop is not None and crop > min(height, width):
        from .errors import DataError

        raise DataError(f"{where}: the image is {width}x{height}, smaller than --crop {crop}; "
                        f"pass a crop of at most {min(height, width)} or none")
