"""The CelebA folder as users have it on disk: the official layout and its text formats.

    ROOT/img_align_celeba/000001.jpg ...        (or img_align_celeba/img_align_celeba/, as the zip unpacks)
    ROOT/list_eval_partition.txt                "000001.jpg 0"            0 train, 1 valid, 2 test
    ROOT/list_attr_celeba.txt                   count, 40 names, "000001.jpg -1  1 ..."
    ROOT/identity_CelebA.txt                    "000001.jpg 2880"
    ROOT/list_landmarks_align_celeba.txt        count, 10 names, "000001.jpg    69  109 ..."

Every annotation file is optional. Parsers split on whitespace, so CRLF line endings and the
official column padding both read; a malformed row is a DataError naming file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

ATTR_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
LANDMARK_NAMES = (
    "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
    "leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
).split()
SPLITS = ("train", "valid", "test")  # the partition file's 0, 1, 2

IMAGE_DIR = "img_align_celeba"
PARTITION_FILE = "list_eval_partition.txt"
ATTR_FILE = "list_attr_celeba.txt"
IDENTITY_FILE = "identity_CelebA.txt"
LANDMARKS_FILE = "list_landmarks_align_celeba.txt"


def natural_key(name: str) -> list:
    """Sort key that orders "2.jpg" before "10.jpg" (the notebook's natsorted)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def find_image_dir(root: Path) -> Path:
    """ROOT/img_align_celeba, or the nested img_align_celeba/img_align_celeba of the zip."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; pass the CelebA root that holds {IMAGE_DIR}/")
    top = root / IMAGE_DIR
    nested = top / IMAGE_DIR
    if nested.is_dir():
        return nested
    if top.is_dir():
        return top
    if root.name == IMAGE_DIR:
        return root
    raise DataError(f"{root}: no {IMAGE_DIR}/ folder inside; pass the CelebA root that holds it")


def list_images(image_dir: Path) -> list[str]:
    """JPEG file names in the folder, naturally sorted."""
    names = [p.name for p in Path(image_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg")]
    if not names:
        raise DataError(f"{image_dir}: holds no .jpg images")
    return sorted(names, key=natural_key)


def _rows(path: Path, header_lines: int, width: int) -> tuple[list[list[str]], list[str]]:
    """Rows of `width` fields after `header_lines` lines; returns (rows, header tokens)."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e}); re-download or fix the file") from None
    header: list[str] = []
    if header_lines == 2:
        if len(lines) < 2:
            raise DataError(f"{path}: missing the count and header lines; re-download the file")
        header = lines[1].split()
        try:
            count = int(lines[0].split()[0])
        except (ValueError, IndexError):
            raise DataError(f"{path}:1: expected the image count, got {lines[0][:40]!r}") from None
    rows = []
    for lineno, line in enumerate(lines[header_lines:], start=header_lines + 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != width:
            raise DataError(f"{path}:{lineno}: expected {width} fields, got {len(fields)}; "
                            "the file is truncated or malformed, re-download it")
        rows.append(fields)
    if header_lines == 2 and count != len(rows):
        raise DataError(f"{path}: header says {count} images but {len(rows)} rows follow; "
                        "the file is truncated, re-download it")
    return rows, header


def _ints(path: Path, rows: list[list[str]], dtype) -> dict[str, np.ndarray]:
    out = {}
    for fields in rows:
        try:
            out[fields[0]] = np.array([int(v) for v in fields[1:]], dtype=dtype)
        except ValueError:
            raise DataError(f"{path}: row {fields[0]} has a non-integer value; fix or re-download "
                            "the file") from None
    return out


def parse_partition(path: Path) -> dict[str, int]:
    rows, _ = _rows(path, 0, 2)
    out = {}
    for name, value in rows:
        if value not in ("0", "1", "2"):
            raise DataError(f"{path}: row {name} has split {value!r}, expected 0, 1 or 2")
        out[name] = int(value)
    return out


def parse_attributes(path: Path) -> dict[str, np.ndarray]:
    """{file: int8[40] of -1/+1}."""
    rows, header = _rows(path, 2, 1 + len(ATTR_NAMES))
    if header != ATTR_NAMES:
        raise DataError(f"{path}:2: header is not the 40 CelebA attribute names; re-download the file")
    out = _ints(path, rows, np.int8)
    for name, values in out.items():
        if not np.all(np.abs(values) == 1):
            raise DataError(f"{path}: row {name} has values other than -1/1")
    return out


def parse_identity(path: Path) -> dict[str, int]:
    rows, _ = _rows(path, 0, 2)
    return {name: int(v[0]) for name, v in _ints(path, rows, np.int64).items()}


def parse_landmarks(path: Path) -> dict[str, np.ndarray]:
    """{file: int16[10]} in aligned-image pixel coordinates."""
    rows, header = _rows(path, 2, 1 + len(LANDMARK_NAMES))
    if header != LANDMARK_NAMES:
        raise DataError(f"{path}:2: header is not the 10 CelebA landmark names; re-download the file")
    return _ints(path, rows, np.int16)


@dataclass
class CelebA:
    """What a CelebA root holds: the image list and whichever annotations are present."""

    root: Path
    image_dir: Path
    images: list[str]
    partition: dict[str, int] | None = None
    attrs: dict[str, np.ndarray] | None = None
    identity: dict[str, int] | None = None
    landmarks: dict[str, np.ndarray] | None = None
    number: dict[str, int] = field(default_factory=dict)  # 1-based position in natural order


def load_celeba(root: Path) -> CelebA:
    """Read a CelebA root; every annotation must cover every image it is used for."""
    root = Path(root).resolve()
    image_dir = find_image_dir(root)
    images = list_images(image_dir)
    ds = CelebA(root, image_dir, images, number={n: i + 1 for i, n in enumerate(images)})
    parsers = {"partition": (PARTITION_FILE, parse_partition), "attrs": (ATTR_FILE, parse_attributes),
               "identity": (IDENTITY_FILE, parse_identity), "landmarks": (LANDMARKS_FILE, parse_landmarks)}
    present = set(images)
    for attr, (filename, parse) in parsers.items():
        path = root / filename
        if not path.is_file():
            continue
        table = parse(path)
        if attr == "partition":
            # A partition row names a file that must exist: a missing image is lost data.
            missing = [n for n in table if n not in present]
            if missing:
                raise DataError(f"{path}: lists {missing[0]} (and {len(missing) - 1} more) but "
                                f"{image_dir} does not hold it; restore the images or remove the rows")
        unlisted = [n for n in images if n not in table]
        if unlisted:
            raise DataError(f"{path}: has no row for {unlisted[0]} (and {len(unlisted) - 1} more "
                            f"images); re-download the file or remove extra images from {image_dir}")
        setattr(ds, attr, table)
    return ds
