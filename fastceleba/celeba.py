"""The CelebA folder as users have it on disk: the official layout, the Kaggle one, and their formats.

    ROOT/img_align_celeba/000001.jpg ...        (or img_align_celeba/img_align_celeba/, as the zip unpacks)
    ROOT/list_eval_partition.txt                "000001.jpg 0"            0 train, 1 valid, 2 test
    ROOT/list_attr_celeba.txt                   count, 40 names, "000001.jpg -1  1 ..."
    ROOT/identity_CelebA.txt                    "000001.jpg 2880"
    ROOT/list_landmarks_align_celeba.txt        count, 10 names, "000001.jpg    69  109 ..."

The Kaggle distribution has the same tables as CSV with an ``image_id,...`` header line
(``list_eval_partition.csv``, ``list_attr_celeba.csv``, ``list_landmarks_align_celeba.csv``,
``list_bbox_celeba.csv``; no identity file). ROOT may also be the image folder itself: the
annotation files are then looked for beside it.

Every annotation file is optional. Parsers split on whitespace (commas for CSV), so CRLF line
endings and the official column padding both read; a malformed row is a DataError naming file and
line, and so is an image listed twice with different values. Image names must be CelebA's
``NNNNNN.jpg``: the number is the image's identity everywhere (the shards' ``num``).
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
BBOX_CSV = "list_bbox_celeba.csv"  # Kaggle: boxes in the in-the-wild images, meaningless for aligned ones
IMAGE_NAME = re.compile(r"(\d{1,9})\.jpe?g", re.IGNORECASE)  # num is an int32


def natural_key(name: str) -> list:
    """Sort key that orders "2.jpg" before "10.jpg" (the notebook's natsorted)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _has_jpegs(folder: Path) -> bool:
    return any(p.suffix.lower() in (".jpg", ".jpeg") for p in folder.iterdir())


def find_image_dir(root: Path) -> Path:
    """ROOT/img_align_celeba, the nested img_align_celeba/img_align_celeba of the zip, or ROOT
    itself when it holds the images."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; pass the CelebA root that holds {IMAGE_DIR}/")
    top = root / IMAGE_DIR
    nested = top / IMAGE_DIR
    if nested.is_dir():
        return nested
    if top.is_dir():
        return top
    if root.name == IMAGE_DIR or _has_jpegs(root):
        return root
    raise DataError(f"{root}: no {IMAGE_DIR}/ folder inside; pass the CelebA root that holds it")


def annotation_dirs(root: Path, image_dir: Path) -> list[Path]:
    """Where annotation files may be: ROOT, and when ROOT is the image folder, the folders above
    it up to the CelebA root (Kaggle: root/img_align_celeba/img_align_celeba/)."""
    dirs = [root]
    if image_dir == root:
        dirs.append(root.parent)
        if root.parent.name == IMAGE_DIR:
            dirs.append(root.parent.parent)
    return dirs


def list_images(image_dir: Path) -> list[str]:
    """JPEG file names in the folder, in file-number order; every name must be ``NNNNNN.jpg``."""
    names = [p.name for p in Path(image_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg")]
    if not names:
        raise DataError(f"{image_dir}: holds no .jpg images")
    seen: dict[int, str] = {}
    for name in names:
        m = IMAGE_NAME.fullmatch(name)
        if m is None:
            raise DataError(f"{image_dir / name}: not a CelebA file name (NNNNNN.jpg, whose number "
                            "becomes the sample's num); rename it to its number or move it out")
        number = int(m.group(1))
        if number in seen:
            raise DataError(f"{image_dir / name}: has the same number as {seen[number]}; "
                            "remove one of the two")
        seen[number] = name
    return [seen[k] for k in sorted(seen)]  # natural order: every name is a unique number


def image_number(name: str) -> int:
    """The CelebA file number of an image name: 000123.jpg -> 123."""
    m = IMAGE_NAME.fullmatch(name)
    if m is None:
        raise DataError(f"{name}: not a CelebA file name (NNNNNN.jpg)")
    return int(m.group(1))


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e}); re-download or fix the file") from None


def _header(path: Path, lines: list[str], columns: list[str] | None, csv: bool) -> tuple[int, int | None]:
    """(lines before the first row, the image count the file states or None).

    The .txt format has a count line and a names line when ``columns`` are given (attributes,
    landmarks) and no header otherwise; the Kaggle .csv always has one ``image_id,...`` line."""
    if csv:
        if not lines:
            raise DataError(f"{path}: empty; re-download the file")
        header, skip, count, line = [f.strip() for f in lines[0].split(",")][1:], 1, None, 1
    elif columns is not None:
        if len(lines) < 2:
            raise DataError(f"{path}: missing the count and header lines; re-download the file")
        header, skip, line = lines[1].split(), 2, 2
        try:
            count = int(lines[0].split()[0])
        except (ValueError, IndexError):
            raise DataError(f"{path}:1: expected the image count, got {lines[0][:40]!r}") from None
    else:
        return 0, None
    if columns is not None and header != columns:
        raise DataError(f"{path}:{line}: header is not the {len(columns)} CelebA column names; "
                        "re-download the file")
    return skip, count


def _bulk_table(body: list[str], width: int, csv: bool, convert) -> dict | None:
    """The common case in a few bulk calls (a full-size attribute table in ~2 s, against ~10 s row
    by row): every row ``width`` fields, a CelebA image name first, no name twice, and
    ``convert`` (the (rows, width - 1) grid of value strings -> one value per row) raising no
    ValueError. None when anything is irregular: ``_table`` then finds the first problem and names
    its line. Where both succeed, they give the same table."""
    text = "\n".join(body)
    tokens = (text.replace(",", " ") if csv else text).split()
    rows = len(tokens) // width
    if not tokens or len(tokens) % width or rows != sum(1 for line in body if line.strip()):
        return None
    grid = np.array(tokens, dtype=object).reshape(rows, width)
    names = grid[:, 0].tolist()
    if len(set(names)) != rows or not all(IMAGE_NAME.fullmatch(n) for n in names):
        return None  # (a row cut short puts a value in the names' column)
    try:
        return dict(zip(names, convert(grid[:, 1:])))
    except (ValueError, OverflowError):
        return None


def _rows(path: Path, body: list[str], skip: int, width: int, csv: bool) -> list[tuple[int, list[str]]]:
    """Rows of ``width`` fields with their line numbers."""
    split = (lambda line: [f.strip() for f in line.split(",")] if line.strip() else []) if csv \
        else str.split
    rows = []
    for lineno, line in enumerate(body, start=skip + 1):
        fields = split(line)
        if not fields:
            continue
        if len(fields) != width:
            raise DataError(f"{path}:{lineno}: expected {width} fields, got {len(fields)}; "
                            "the file is truncated or malformed, re-download it")
        rows.append((lineno, fields))
    return rows


def _table(path: Path, rows, convert, warnings: list[str] | None) -> dict:
    """{image: value}; an image listed twice is an error when the rows disagree, else a warning."""
    out, where = {}, {}
    for lineno, fields in rows:
        name = fields[0]
        try:
            value = convert(fields[1:])
        except (ValueError, OverflowError) as e:
            raise DataError(f"{path}:{lineno}: row {name} has a bad value ({e}); fix or re-download "
                            "the file") from None
        if name in out:
            if not np.array_equal(out[name], value):
                raise DataError(f"{path}: {name} is listed twice with different values, at lines "
                                f"{where[name]} and {lineno}; delete the wrong row or re-download the file")
            if warnings is not None:
                warnings.append(f"{path}: {name} is listed twice (lines {where[name]} and {lineno}, "
                                "same values); using it once")
            continue
        out[name], where[name] = value, lineno
    return out


def _parse(path: Path, columns: list[str] | None, width: int, convert_row, convert_grid,
           warnings: list[str] | None) -> dict:
    """{image: value} of one annotation file: in bulk when it is regular, else row by row."""
    path = Path(path)
    lines = _read_lines(path)
    csv = path.suffix.lower() == ".csv"
    skip, count = _header(path, lines, columns, csv)
    table = _bulk_table(lines[skip:], width, csv, convert_grid)
    if table is None:
        rows = _rows(path, lines[skip:], skip, width, csv)
        if count is not None and count != len(rows):
            raise DataError(f"{path}: header says {count} images but {len(rows)} rows follow; "
                            "the file is truncated, re-download it")
        table = _table(path, rows, convert_row, warnings)
    elif count is not None and count != len(table):
        raise DataError(f"{path}: header says {count} images but {len(table)} rows follow; "
                        "the file is truncated, re-download it")
    return table


def _int_array(dtype):
    return lambda values: np.array([int(v) for v in values], dtype=dtype)


def _int_grid(dtype, check=None):
    """The bulk twin of ``_int_array``: int() of every string, then the range of ``dtype``."""
    def convert(grid: np.ndarray) -> list[np.ndarray]:
        values = grid.astype(np.int64)  # int() of each string, as the row parser
        info = np.iinfo(dtype)
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise OverflowError(dtype)
        if check is not None and not check(values):
            raise ValueError("a value out of the table's range")
        return list(values.astype(dtype))
    return convert


def _split_value(values: list[str]) -> int:
    if values[0] not in ("0", "1", "2"):
        raise ValueError(f"split {values[0]!r}, expected 0, 1 or 2")
    return int(values[0])


def _split_grid(grid: np.ndarray) -> list[int]:
    column = grid[:, 0].tolist()
    if not set(column) <= {"0", "1", "2"}:
        raise ValueError("a split other than 0, 1 or 2")
    return [int(v) for v in column]


def _pm_one(values: list[str]) -> np.ndarray:
    arr = _int_array(np.int8)(values)
    if not _all_pm_one(arr):
        raise ValueError("values other than -1/1")
    return arr


def _all_pm_one(values: np.ndarray) -> bool:
    return bool(np.all(np.abs(values) == 1))


def parse_partition(path: Path, warnings: list[str] | None = None) -> dict[str, int]:
    csv = Path(path).suffix.lower() == ".csv"
    return _parse(path, ["partition"] if csv else None, 2, _split_value, _split_grid, warnings)


def parse_attributes(path: Path, warnings: list[str] | None = None) -> dict[str, np.ndarray]:
    """{file: int8[40] of -1/+1}."""
    return _parse(path, ATTR_NAMES, 1 + len(ATTR_NAMES), _pm_one, _int_grid(np.int8, _all_pm_one), warnings)


def parse_identity(path: Path, warnings: list[str] | None = None) -> dict[str, int]:
    return _parse(path, None, 2, lambda v: int(v[0]), lambda g: [int(v) for v in g[:, 0].tolist()], warnings)


def parse_landmarks(path: Path, warnings: list[str] | None = None) -> dict[str, np.ndarray]:
    """{file: int16[10]} in aligned-image pixel coordinates."""
    return _parse(path, LANDMARK_NAMES, 1 + len(LANDMARK_NAMES), _int_array(np.int16), _int_grid(np.int16),
                  warnings)


# What each annotation is called in the official (.txt) and Kaggle (.csv) distributions.
ANNOTATIONS = {
    "partition": ((PARTITION_FILE, "list_eval_partition.csv"), parse_partition),
    "attrs": ((ATTR_FILE, "list_attr_celeba.csv"), parse_attributes),
    "identity": ((IDENTITY_FILE,), parse_identity),
    "landmarks": ((LANDMARKS_FILE, "list_landmarks_align_celeba.csv"), parse_landmarks),
}


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
    number: dict[str, int] = field(default_factory=dict)  # the CelebA file number: 000123.jpg -> 123
    sources: dict[str, Path | None] = field(default_factory=dict)  # annotation -> the file used
    warnings: list[str] = field(default_factory=list)  # things the user should hear about

    def describe(self) -> list[str]:
        """One line per annotation: which file was used, or that none was found."""
        where = " or ".join(str(d) for d in annotation_dirs(self.root, self.image_dir))
        lines = [f"images: {len(self.images)} in {self.image_dir}"]
        for attr, (names, _) in ANNOTATIONS.items():
            src = self.sources.get(attr)
            if src is not None:
                lines.append(f"{attr}: using {src}")
            else:
                lines.append(f"{attr}: none ({' / '.join(names)} not in {where})"
                             + ("; using a seeded random split (--split, --seed)" if attr == "partition" else ""))
        return lines


def load_celeba(root: Path) -> CelebA:
    """Read a CelebA root; every annotation must cover every image it is used for."""
    root = Path(root).resolve()
    image_dir = find_image_dir(root)
    images = list_images(image_dir)
    ds = CelebA(root, image_dir, images, number={n: image_number(n) for n in images})
    dirs = annotation_dirs(root, image_dir)
    present = set(images)
    for attr, (filenames, parse) in ANNOTATIONS.items():
        found = [d / f for d in dirs for f in filenames if (d / f).is_file()]
        ds.sources[attr] = None
        if not found:
            continue
        path = found[0]  # the official .txt before the Kaggle .csv, nearest folder first
        for other in found[1:]:
            ds.warnings.append(f"{other}: not used; reading {attr} from {path}")
        table = parse(path, ds.warnings)
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
        ds.sources[attr] = path
    for d in dirs:
        if (d / BBOX_CSV).is_file():
            ds.warnings.append(f"{d / BBOX_CSV}: not used (boxes in the in-the-wild images, not the "
                               "aligned ones)")
    return ds
