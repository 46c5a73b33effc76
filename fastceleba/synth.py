"""Synthetic CelebA: face-like pictures and annotations in the exact CelebA on-disk layout.

No CelebA can be downloaded where this project is built and tested, so tests, the demo and the
benchmarks run on data made here. ``generate(root, n)`` writes::

    root/img_align_celeba/000001.jpg ...      178 wide x 218 high RGB JPEGs (quality 90, ~5-15 KB)
    root/list_eval_partition.txt              "000001.jpg 0" (0 train, 1 valid, 2 test)
    root/list_attr_celeba.txt                 count, 40 names, "000001.jpg -1  1 ..." rows
    root/identity_CelebA.txt                  "000001.jpg 2880"
    root/list_landmarks_align_celeba.txt      count, 10 names, "000001.jpg    69  109 ..." rows

Text layout matched to the official files (checked against copies of their first rows quoted in
public repositories; the official files themselves cannot be fetched here):

* ``list_attr_celeba.txt``: line 1 the count; line 2 the 40 names joined by single spaces WITH a
  trailing space (``"... Wearing_Necktie Young \\n"``, as the official header); rows are the file
  name then ``" %2d"`` per value, so ``"000001.jpg -1  1  1 -1"`` (no trailing space).
* ``list_landmarks_align_celeba.txt``: line 1 the count; line 2 the 10 names, single spaces, no
  trailing space; rows are the file name, one space, then ``"%5d"`` per value:
  ``"000001.jpg    69  109  106  113   77  142   73  152  108  154"`` (4 spaces before the first
  value: a public reader of the official file collapses runs of 4, 3 and 2 spaces, and 3-digit
  values sit in 5-wide columns).
* ``identity_CelebA.txt`` and ``list_eval_partition.txt``: ``"000001.jpg 2880"``, no header.
* Line endings are ``"\\n"``. (Some old tools strip ``"\\r\\n"`` from the official files, so a
  parser should accept both; we write the plain Unix form.)

Pictures are drawn with PIL ImageDraw: background gradient, clothes, neck, head, hair, eyes, brows,
nose, mouth, optional glasses / hat / beard / mustache / goatee / bangs / earrings / necktie, then a
light blur, a lighting ramp and sensor noise so the JPEGs are not trivially compressible. Faces
are aligned like CelebA (eyes near (69,111) and (108,111), nose near (89,134), mouth corners near
(72,152) and (106,152)) with a few pixels of jitter, and the landmarks are the exact integer pixels
where the eye centres, nose tip and mouth corners were drawn.

Attributes true to the picture: Smiling, Mouth_Slightly_Open, Eyeglasses, Wearing_Hat, Bald,
Black_Hair, Blond_Hair, Brown_Hair, Gray_Hair, Mustache, Goatee, No_Beard, Male (facial hair only
on males), Pale_Skin, Bangs, Receding_Hairline, Sideburns, Narrow_Eyes, Bushy_Eyebrows,
Arched_Eyebrows, Big_Nose, Big_Lips, Chubby, Oval_Face, Rosy_Cheeks, Wearing_Lipstick,
Wearing_Earrings, Wearing_Necklace, Wearing_Necktie, Blurry, 5_o_Clock_Shadow. The rest
(Attractive, Young, Heavy_Makeup, ...) are seeded random. Frequencies are NOT CelebA's: rare
attributes (glasses, hats) are made commoner so small test sets contain them.

About ``num_images / 20`` identities; each identity fixes sex, skin tone, hair colour and style,
face shape and facial hair, so identity carries signal. Image ``k`` (1-based) draws from
``numpy.random.default_rng([seed, 0, k])`` and identity ``i`` from ``default_rng([seed, 1, i])``,
so the same ``(num_images, seed)`` gives byte-identical files whatever the worker count.
The attribute and landmark names and the file names come from ``fastceleba.celeba``.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from .celeba import (  # the official names and file names live with the parsers
    ATTR_FILE, ATTR_NAMES, IDENTITY_FILE, IMAGE_DIR, LANDMARK_NAMES, LANDMARKS_FILE, PARTITION_FILE,
)
from .errors import DataError
from .files import atomic_write

WIDTH, HEIGHT = 178, 218
JPEG_QUALITY = 90
IMAGES_PER_IDENTITY = 20

# Nominal CelebA-aligned landmark positions: left eye, right eye, nose tip, mouth corners.
NOMINAL_LANDMARKS = (69, 111, 108, 111, 89, 134, 72, 152, 106, 152)

# Base colours (per-identity jitter of a few levels is added), exported for tests.
HAIR_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (28, 22, 20),
    "brown": (105, 64, 36),
    "blond": (228, 198, 122),
    "gray": (168, 168, 172),
}
# Facial hair differs from head hair only where the head-hair colour is too close to some skin.
BEARD_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (28, 22, 20), "brown": (94, 58, 32), "blond": (200, 160, 60), "gray": (168, 168, 172),
    "bald": (50, 40, 34),
}
HAT_COLORS = ((196, 38, 42), (38, 70, 164), (36, 122, 60), (122, 58, 142))
GLASSES_COLOR = (18, 18, 24)
PALE_SKIN = (248, 228, 214)
SKIN_LIGHT, SKIN_DARK = (226, 184, 152), (152, 102, 74)
MOUTH_INSIDE = (70, 18, 26)
TEETH = (236, 232, 218)

_A = {name: i for i, name in enumerate(ATTR_NAMES)}
_NAME_RE = re.compile(r"^\d{6}\.jpg$")


@dataclass(frozen=True)
class Face:
    """One rendered picture and its annotations (landmarks in ``LANDMARK_NAMES`` order)."""

    image: Image.Image
    attrs: tuple[int, ...]
    identity: int
    landmarks: tuple[int, ...]


def num_identities(num_images: int) -> int:
    """How many identities a set of ``num_images`` pictures uses (about one per 20 images)."""
    return max(1, round(num_images / IMAGES_PER_IDENTITY))


def partition_counts(num_images: int, partition: Sequence[float]) -> tuple[int, int, int]:
    """(train, valid, test) sizes for contiguous blocks in file order, as the official split."""
    fracs = [float(f) for f in partition]
    if len(fracs) != 3 or any(f < 0 for f in fracs) or abs(sum(fracs) - 1.0) > 1e-6:
        raise DataError(f"partition {tuple(partition)} is not 3 non-negative fractions summing to 1; "
                        "pass e.g. (0.8, 0.1, 0.1)")
    n_train = round(num_images * fracs[0])
    n_valid = min(round(num_images * fracs[1]), num_images - n_train)
    return n_train, n_valid, num_images - n_train - n_valid


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _mix(a: Sequence[int], b: Sequence[int], t: float) -> tuple[int, int, int]:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


def _shade(rgb: Sequence[int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, round(c * f))) for c in rgb)


def _bezier(p0: tuple[int, int], ctrl: tuple[float, float], p1: tuple[int, int], n: int = 12):
    """Points of a quadratic curve that starts and ends exactly at the integer points p0, p1."""
    pts = []
    for t in np.linspace(0.0, 1.0, n):
        x = (1 - t) ** 2 * p0[0] + 2 * t * (1 - t) * ctrl[0] + t ** 2 * p1[0]
        y = (1 - t) ** 2 * p0[1] + 2 * t * (1 - t) * ctrl[1] + t ** 2 * p1[1]
        pts.append((float(x), float(y)))
    pts[0], pts[-1] = (float(p0[0]), float(p0[1])), (float(p1[0]), float(p1[1]))
    return pts


_NOISE_MARGIN = 64
_NOISE: np.ndarray | None = None


def _noise_tile() -> np.ndarray:
    """Fixed sensor-noise texture (sigma 3); each picture adds a crop at a seeded offset.

    Drawing fresh Gaussian noise per picture costs more than the rest of the drawing; a crop of
    one fixed tile is as incompressible for JPEG and stays deterministic.
    """
    global _NOISE
    if _NOISE is None:
        shape = (HEIGHT + _NOISE_MARGIN, WIDTH + _NOISE_MARGIN, 3)
        _NOISE = np.rint(np.random.default_rng(20150601).normal(0.0, 3.0, shape)).astype(np.int16)
    return _NOISE


def _identity_traits(seed: int, identity: int) -> dict:
    """Fixed look of one identity: sex, skin, hair, face shape, facial hair."""
    rng = np.random.default_rng([seed, 1, identity])
    r = rng.random
    male = r() < 0.42
    pale = r() < 0.12
    if pale:
        skin = _jitter(rng, PALE_SKIN, 4)
    else:
        skin = _jitter(rng, _mix(SKIN_LIGHT, SKIN_DARK, float(r())), 5)
    if male:
        hair = rng.choice(["bald", "black", "brown", "blond", "gray"], p=[0.12, 0.33, 0.3, 0.13, 0.12])
    else:
        hair = rng.choice(["black", "brown", "blond", "gray"], p=[0.3, 0.34, 0.3, 0.06])
    hair = str(hair)
    bald = hair == "bald"
    t = {
        "male": male, "pale": pale, "skin": skin, "hair": hair,
        "hair_rgb": _jitter(rng, HAIR_COLORS.get(hair, (0, 0, 0)), 6),
        "beard_rgb": _jitter(rng, BEARD_COLORS[hair], 6),
        "long_hair": (not bald) and r() < (0.05 if male else 0.85),
        "wavy": (not bald) and r() < 0.35,
        "straight": False,
        "bangs": (not bald) and r() < (0.05 if male else 0.3),
        "receding": (not bald) and male and r() < 0.2,
        "sideburns": (not bald) and male and r() < 0.2,
        "mustache": male and r() < 0.25,
        "goatee": male and r() < 0.2,
        "full_beard": male and r() < 0.2,
        "big_nose": r() < 0.25,
        "pointy_nose": r() < 0.3,
        "big_lips": r() < 0.25,
        "arched": r() < (0.05 if male else 0.45),
        "bushy": r() < (0.3 if male else 0.08),
        "chubby": r() < 0.08,
        "oval": r() < 0.3,
        "young": r() < 0.75,
        "attractive": r() < (0.3 if male else 0.65),
        "eye_rgb": _jitter(rng, [(70, 44, 28), (60, 100, 150), (70, 110, 70), (40, 30, 26)][rng.integers(4)], 8),
        "lipstick_habit": (not male) and r() < 0.85,
        "double_chin": False,
    }
    t["straight"] = (not bald) and (not t["wavy"]) and r() < 0.45
    t["double_chin"] = t["chubby"] and r() < 0.5
    return t


def render_face(number: int, *, seed: int = 0, identities: int = 1) -> Face:
    """Draw picture ``number`` (1-based, the file number) of a set with ``identities`` identities."""
    rng = np.random.default_rng([seed, 0, number])
    r = rng.random
    identity = int(rng.integers(1, identities + 1))
    t = _identity_traits(seed, identity)
    male, bald = t["male"], t["hair"] == "bald"
    skin, hair_rgb = t["skin"], t["hair_rgb"]

    # Per-picture choices.
    smiling = r() < 0.48
    mouth_open = r() < (0.7 if smiling else 0.25)
    glasses = r() < 0.12
    hat = r() < 0.1
    narrow = r() < 0.1
    rosy = r() < (0.04 if male else 0.12)
    lipstick = t["lipstick_habit"] and r() < 0.9
    makeup = lipstick and r() < 0.6
    earrings = (not male) and r() < 0.3
    necklace = (not male) and r() < 0.15
    necktie = male and r() < 0.12
    blurry = r() < 0.05
    stubble = male and not t["full_beard"] and r() < 0.25
    # A male identity sometimes appears shaved.
    shaved = r() < 0.15
    mustache = t["mustache"] and not shaved
    goatee = t["goatee"] and not shaved
    full_beard = t["full_beard"] and not shaved
    bags = r() < 0.2
    high_cheek = r() < (0.75 if smiling else 0.15)

    # Geometry, all relative to the jittered face offset (dx, dy).
    dx, dy = int(rng.integers(-3, 4)), int(rng.integers(-3, 4))
    j = lambda k=2: int(rng.integers(-k, k + 1))  # noqa: E731 - per-landmark jitter
    n = NOMINAL_LANDMARKS
    eye_dy, mouth_dy = dy + j(), dy + j()  # pairs move together, then tilt by at most 2 px
    lex, ley = n[0] + dx + j(), n[1] + eye_dy + j(1)
    rex, rey = n[2] + dx + j(), n[3] + eye_dy + j(1)
    nx, ny = n[4] + dx + j(), n[5] + dy + j()
    lmx, lmy = n[6] + dx + j() - (1 if t["big_lips"] else 0), n[7] + mouth_dy + j(1)
    rmx, rmy = n[8] + dx + j() + (1 if t["big_lips"] else 0), n[9] + mouth_dy + j(1)
    if smiling:  # a smile lifts the corners a little
        lmy -= 1
        rmy -= 1
    cx, ey = 89 + dx, 111 + dy
    mx, my = (lmx + rmx) // 2, (lmy + rmy) // 2
    hw = 47 + int(rng.integers(-2, 3)) + (5 if t["chubby"] else 0) - (3 if t["oval"] else 0)
    head_t = ey - 53 - int(rng.integers(0, 3)) - (2 if t["oval"] else 0)
    chin = my + 30 + (3 if t["oval"] else 0)
    head_l, head_r = cx - hw, cx + hw
    hairline = ey - (38 if t["receding"] else 30)

    # Background: vertical gradient between two random colours.
    top = rng.integers(30, 235, size=3)
    bottom = np.clip(top + rng.integers(-70, 71, size=3), 0, 255)
    ramp = np.linspace(0.0, 1.0, HEIGHT, dtype=np.float32)[:, None, None]
    bg = top * (1 - ramp) + bottom * ramp
    img = Image.fromarray(np.broadcast_to(bg, (HEIGHT, WIDTH, 3)).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)

    # Clothes, long hair behind the head, neck, ears.
    clothes = tuple(int(c) for c in rng.integers(20, 230, size=3))
    d.ellipse((cx - 80, chin + 8, cx + 80, chin + 110), fill=clothes)
    if t["long_hair"]:
        d.rounded_rectangle((head_l - 9, head_t - 10, head_r + 9, chin + 22), radius=30, fill=hair_rgb)
    elif not bald:
        d.ellipse((head_l - 6, head_t - 12, head_r + 6, ey + 12), fill=hair_rgb)
    d.rectangle((cx - 17, chin - 20, cx + 17, chin + 16), fill=_shade(skin, 0.9))
    if necktie:
        tie = _jitter(rng, (150, 30, 40), 40)
        d.polygon([(cx - 5, chin + 12), (cx + 5, chin + 12), (cx + 7, HEIGHT), (cx - 7, HEIGHT)], fill=tie)
    if necklace:
        d.arc((cx - 19, chin - 14, cx + 19, chin + 16), 20, 160, fill=(222, 186, 70), width=3)
    for ex0 in (head_l - 6, head_r - 6):
        d.ellipse((ex0, ey - 6, ex0 + 12, ey + 20), fill=_shade(skin, 0.93))
    if earrings:
        for ex0 in (head_l - 1, head_r + 1):
            d.ellipse((ex0 - 3, ey + 20, ex0 + 3, ey + 26), fill=(230, 196, 80))

    # Head, then the hair cap (upper half ellipse whose flat lower edge is the hairline).
    d.ellipse((head_l, head_t, head_r, chin), fill=skin)
    if t["double_chin"]:
        d.arc((cx - 22, chin - 14, cx + 22, chin + 4), 30, 150, fill=_shade(skin, 0.8), width=2)
    if not bald:
        d.chord((head_l - 6, head_t - 14, head_r + 6, 2 * hairline - (head_t - 14)), 180, 360, fill=hair_rgb)
        if t["sideburns"]:
            for x0 in (head_l + 1, head_r - 8):
                d.rectangle((x0, hairline - 2, x0 + 7, ey + 16), fill=hair_rgb)
        if t["bangs"]:
            pts = [(head_l + 6, hairline - 4)]
            for k in range(9):
                x = head_l + 10 + k * (2 * hw - 20) / 8
                pts.append((x, ey - 22 - (k % 2) * 6))
            pts.append((head_r - 6, hairline - 4))
            d.polygon(pts, fill=hair_rgb)

    # Facial hair (males only), drawn before the mouth so the lips stay on top.
    beard_rgb = t["beard_rgb"]
    if stubble:
        d.chord((head_l, head_t, head_r, chin), 22, 158, fill=_shade(skin, 0.96))
    if full_beard:
        d.chord((head_l, head_t, head_r, chin + 2), 20, 160, fill=beard_rgb)
    if goatee:
        d.chord((mx - 14, my + 4, mx + 14, chin + 1), 0, 180, fill=beard_rgb)
        d.rectangle((mx - 14, my + 7, mx + 14, (my + 4 + chin + 1) // 2), fill=beard_rgb)
    if mustache:
        d.polygon([(lmx, my - 1), (mx - 6, my - 10), (mx + 6, my - 10), (rmx, my - 1), (mx, my - 4)],
                  fill=beard_rgb)

    # Cheeks, eyes, brows.
    if rosy:
        for ex0 in (lex - 2, rex + 2):
            d.ellipse((ex0 - 8, ny + 1, ex0 + 8, ny + 14), fill=_mix(skin, (232, 112, 120), 0.4))
    brow_rgb = _shade(hair_rgb, 0.8) if not bald and t["hair"] != "blond" else _shade(skin, 0.55)
    eh = 2 if narrow else 4
    for (ex, eyy) in ((lex, ley), (rex, rey)):
        if makeup:
            d.ellipse((ex - 9, eyy - eh - 4, ex + 9, eyy + 1), fill=_mix(skin, (120, 80, 150), 0.35))
        if bags:
            d.arc((ex - 7, eyy - 2, ex + 7, eyy + eh + 5), 20, 160, fill=_shade(skin, 0.8), width=1)
        d.ellipse((ex - 7, eyy - eh, ex + 7, eyy + eh), fill=(244, 242, 236), outline=_shade(skin, 0.5))
        d.ellipse((ex - 3, eyy - 3, ex + 3, eyy + 3), fill=t["eye_rgb"])
        d.ellipse((ex - 1, eyy - 1, ex + 1, eyy + 1), fill=(10, 10, 10))
        arch = 5 if t["arched"] else 2
        d.line([(ex - 9, eyy - 10), (ex, eyy - 11 - arch), (ex + 9, eyy - 10)], fill=brow_rgb,
               width=4 if t["bushy"] else 2, joint="curve")

    # Nose: shaded ridge, nostrils, and the tip drawn centred on the landmark pixel.
    nw = 8 if t["big_nose"] else 5
    d.polygon([(nx, ey + 4), (nx - nw, ny + 1), (nx + nw, ny + 1)], fill=_shade(skin, 0.92))
    for sx in (-1, 1):
        d.ellipse((nx + sx * (nw - 1) - 2, ny, nx + sx * (nw - 1) + 2, ny + 3), fill=_shade(skin, 0.55))
    tip = 1 if t["pointy_nose"] else 2
    d.ellipse((nx - tip, ny - tip, nx + tip, ny + tip), fill=_shade(skin, 0.78))

    # Mouth: its corners are exactly the landmark pixels L and R.
    lip = _jitter(rng, (192, 40, 62), 10) if lipstick else (int(skin[0] * 0.72), skin[1] // 2, skin[2] // 2)
    lip_w = 4 if t["big_lips"] else 3
    L, R = (lmx, lmy), (rmx, rmy)
    if smiling and mouth_open:
        upper = _bezier(L, (mx, my + 4), R)
        lower = _bezier(L, (mx, my + 18), R)
        d.polygon(upper + lower[::-1], fill=MOUTH_INSIDE)
        d.polygon(upper + _bezier(L, (mx, my + 8), R)[::-1], fill=TEETH)
        d.line(upper, fill=lip, width=lip_w - 1, joint="curve")
        d.line(lower, fill=lip, width=lip_w, joint="curve")
    elif smiling:
        d.line(_bezier(L, (mx, my + 12), R), fill=lip, width=lip_w + 1, joint="curve")
    elif mouth_open:
        d.ellipse((lmx + 3, my - 3, rmx - 3, my + 5), fill=MOUTH_INSIDE, outline=lip, width=2)
        d.line([L, (lmx + 4, my)], fill=lip, width=2)
        d.line([(rmx - 4, my), R], fill=lip, width=2)
    else:
        d.line(_bezier(L, (mx, my + 1), R), fill=lip, width=lip_w, joint="curve")

    if glasses:
        for (ex, eyy) in ((lex, ley), (rex, rey)):
            d.ellipse((ex - 13, eyy - 10, ex + 13, eyy + 10), outline=GLASSES_COLOR, width=3)
        d.line([(lex + 13, ley), (rex - 13, rey)], fill=GLASSES_COLOR, width=4)
        d.line([(lex - 13, ley), (head_l - 2, ley - 3)], fill=GLASSES_COLOR, width=2)
        d.line([(rex + 13, rey), (head_r + 2, rey - 3)], fill=GLASSES_COLOR, width=2)
    if hat:
        hat_rgb = _jitter(rng, HAT_COLORS[int(rng.integers(len(HAT_COLORS)))], 10)
        d.rounded_rectangle((head_l - 2, head_t - 26, head_r + 2, head_t + 18), radius=14, fill=hat_rgb)
        d.ellipse((head_l - 16, head_t + 10, head_r + 16, head_t + 24), fill=_shade(hat_rgb, 0.85))

    # Photographic touches: soften edges (or blur hard), lighting ramp, sensor noise.
    img = img.filter(ImageFilter.GaussianBlur(2.2) if blurry else ImageFilter.BoxBlur(1))
    arr = np.asarray(img).astype(np.int16)
    oy, ox = (int(v) for v in rng.integers(0, _NOISE_MARGIN, size=2))
    arr += _noise_tile()[oy:oy + HEIGHT, ox:ox + WIDTH]
    light = np.rint(np.linspace(-1.0, 1.0, WIDTH) * rng.uniform(-18.0, 18.0)).astype(np.int16)
    arr += light[None, :, None]  # side lighting: one side a little brighter
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")

    on = {
        "5_o_Clock_Shadow": stubble, "Arched_Eyebrows": t["arched"], "Attractive": t["attractive"],
        "Bags_Under_Eyes": bags, "Bald": bald, "Bangs": t["bangs"], "Big_Lips": t["big_lips"],
        "Big_Nose": t["big_nose"], "Black_Hair": t["hair"] == "black", "Blond_Hair": t["hair"] == "blond",
        "Blurry": blurry, "Brown_Hair": t["hair"] == "brown", "Bushy_Eyebrows": t["bushy"],
        "Chubby": t["chubby"], "Double_Chin": t["double_chin"], "Eyeglasses": glasses,
        "Goatee": goatee and not full_beard, "Gray_Hair": t["hair"] == "gray", "Heavy_Makeup": makeup,
        "High_Cheekbones": high_cheek, "Male": male, "Mouth_Slightly_Open": mouth_open,
        "Mustache": mustache, "Narrow_Eyes": narrow, "No_Beard": not (goatee or full_beard),
        "Oval_Face": t["oval"], "Pale_Skin": t["pale"], "Pointy_Nose": t["pointy_nose"],
        "Receding_Hairline": t["receding"], "Rosy_Cheeks": rosy, "Sideburns": t["sideburns"],
        "Smiling": smiling, "Straight_Hair": t["straight"], "Wavy_Hair": t["wavy"],
        "Wearing_Earrings": earrings, "Wearing_Hat": hat, "Wearing_Lipstick": lipstick,
        "Wearing_Necklace": necklace, "Wearing_Necktie": necktie, "Young": t["young"],
    }
    attrs = tuple(1 if on[name] else -1 for name in ATTR_NAMES)
    landmarks = (lex, ley, rex, rey, nx, ny, lmx, lmy, rmx, rmy)
    return Face(img, attrs, identity, landmarks)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _name(number: int) -> str:
    return f"{number:06d}.jpg"


def _render_chunk(args: tuple[int, int, int, int, str]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Render, encode and write pictures start..stop-1 (1-based); return their annotations."""
    seed, identities, start, stop, image_dir = args
    attrs = np.empty((stop - start, len(ATTR_NAMES)), np.int8)
    ident = np.empty(stop - start, np.int32)
    lmk = np.empty((stop - start, len(LANDMARK_NAMES)), np.int16)
    for k, number in enumerate(range(start, stop)):
        face = render_face(number, seed=seed, identities=identities)
        buf = io.BytesIO()
        face.image.save(buf, "JPEG", quality=JPEG_QUALITY)
        atomic_write(Path(image_dir) / _name(number), buf.getvalue(), sync=False)
        attrs[k], ident[k], lmk[k] = face.attrs, face.identity, face.landmarks
    return start, attrs, ident, lmk


def _prepare_image_dir(image_dir: Path, num_images: int, overwrite: bool) -> None:
    if image_dir.exists() and not image_dir.is_dir():
        raise DataError(f"{image_dir} exists and is not a directory; remove it or choose another root")
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = list(os.scandir(image_dir))
    if entries and not overwrite:
        raise DataError(f"{image_dir} already holds {len(entries)} files; pass overwrite=True "
                        "(--overwrite) or choose an empty root")
    # With overwrite, drop numbered pictures (and our leftover temp files) the new set will not
    # rewrite, so the folder never mixes an old, larger set with the new annotations.
    for e in entries:
        leftover = re.fullmatch(r"\.\d{6}\.jpg\.\w+\.tmp", e.name)  # fastceleba.files' temp names
        if e.is_file() and (leftover or _NAME_RE.match(e.name) and int(e.name[:6]) > num_images):
            os.remove(e.path)


def _text_files(num_images: int, partition: Sequence[float], attrs: np.ndarray, ident: np.ndarray,
                lmk: np.ndarray) -> dict[str, str]:
    names = [_name(k) for k in range(1, num_images + 1)]
    n_train, n_valid, _ = partition_counts(num_images, partition)
    split = [0 if k < n_train else 1 if k < n_train + n_valid else 2 for k in range(num_images)]
    return {
        PARTITION_FILE: "".join(f"{nm} {s}\n" for nm, s in zip(names, split)),
        ATTR_FILE: f"{num_images}\n" + " ".join(ATTR_NAMES) + " \n"
        + "".join(nm + "".join(f" {v:2d}" for v in row) + "\n" for nm, row in zip(names, attrs.tolist())),
        IDENTITY_FILE: "".join(f"{nm} {i}\n" for nm, i in zip(names, ident.tolist())),
        LANDMARKS_FILE: f"{num_images}\n" + " ".join(LANDMARK_NAMES) + "\n"
        + "".join(nm + " " + "".join(f"{v:5d}" for v in row) + "\n" for nm, row in zip(names, lmk.tolist())),
    }


def generate(root: str | os.PathLike, num_images: int, seed: int = 0, *,
             partition: Sequence[float] = (0.8, 0.1, 0.1), workers: int | None = None,
             progress: bool = True, overwrite: bool = False) -> Path:
    """Write a synthetic CelebA of ``num_images`` pictures under ``root``; return ``root``.

    Byte-identical output for the same ``(num_images, seed, partition)`` whatever ``workers``
    (default ``os.cpu_count()``). Every file is written to a temporary name and renamed. Raises
    DataError for bad arguments or if ``root/img_align_celeba`` already holds files and
    ``overwrite`` is false.
    """
    if not 1 <= int(num_images) <= 999_999:
        raise DataError(f"num_images={num_images} is out of range; pass 1..999999 (names are 6 digits)")
    if int(seed) < 0:
        raise DataError(f"seed={seed} is negative; pass a seed >= 0")
    num_images, seed = int(num_images), int(seed)
    partition_counts(num_images, partition)  # validate before touching the disk
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise DataError(f"workers={workers}; pass workers >= 1")

    root = Path(root)
    image_dir = root / IMAGE_DIR
    _prepare_image_dir(image_dir, num_images, overwrite)

    identities = num_identities(num_images)
    chunk = max(16, min(256, -(-num_images // (workers * 8))))  # several chunks per worker
    jobs = [(seed, identities, s, min(s + chunk, num_images + 1), str(image_dir))
            for s in range(1, num_images + 1, chunk)]
    attrs = np.empty((num_images, len(ATTR_NAMES)), np.int8)
    ident = np.empty(num_images, np.int32)
    lmk = np.empty((num_images, len(LANDMARK_NAMES)), np.int16)
    with tqdm(total=num_images, unit="img", desc="synthetic CelebA", disable=not progress) as bar:
        def collect(result):
            start, a, i, m = result
            rows = slice(start - 1, start - 1 + len(i))
            attrs[rows], ident[rows], lmk[rows] = a, i, m
            bar.update(len(i))

        if workers == 1 or len(jobs) == 1:
            for job in jobs:
                collect(_render_chunk(job))
        else:
            # fork where the platform has it: workers start in a blink and need no `__main__`
            # guard in the caller (spawn breaks `python - <<EOF` scripts). They only run numpy
            # and PIL code, never torch or DALI, so threads those hold in the parent are harmless.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                for result in pool.map(_render_chunk, jobs):
                    collect(result)

    for name, text in _text_files(num_images, partition, attrs, ident, lmk).items():
        atomic_write(root / name, text.encode("ascii"))
    return root
