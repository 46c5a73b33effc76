"""Drawing one synthetic face: the pictures behind fastceleba.synth's synthetic CelebA.

Pictures are drawn with PIL ImageDraw in named steps, each readable alone: background and body
(clothes, long hair, neck, ears), head and hair, facial hair, eyes, nose, mouth, accessories
(glasses, hat), then the photographic touches (a light blur, a lighting ramp and sensor noise so the
JPEGs are not trivially compressible). Faces are aligned like CelebA (eyes near (69,111) and
(108,111), nose near (89,134), mouth corners near (72,152) and (106,152)) with a few pixels of
jitter, and the landmarks are the exact integer pixels where the eye centres, nose tip and mouth
corners were drawn.

Attributes true to the picture: Smiling, Mouth_Slightly_Open, Eyeglasses, Wearing_Hat, Bald,
Black_Hair, Blond_Hair, Brown_Hair, Gray_Hair, Mustache, Goatee, No_Beard, Male (facial hair only
on males), Pale_Skin, Bangs, Receding_Hairline, Sideburns, Narrow_Eyes, Bushy_Eyebrows,
Arched_Eyebrows, Big_Nose, Big_Lips, Chubby, Oval_Face, Rosy_Cheeks, Wearing_Lipstick,
Wearing_Earrings, Wearing_Necklace, Wearing_Necktie, Blurry, 5_o_Clock_Shadow. The rest
(Attractive, Young, Heavy_Makeup, ...) are seeded random. Frequencies are NOT CelebA's: rare
attributes (glasses, hats) are made commoner so small test sets contain them.

Each identity fixes sex, skin tone, hair colour and style, face shape and facial hair, so identity
carries signal. Picture ``k`` (1-based) draws from ``numpy.random.default_rng([seed, 0, k])`` and
identity ``i`` from ``default_rng([seed, 1, i])``. The steps draw from the picture's generator in a
fixed order (choices, geometry, background, body, mouth, accessories, photograph), so a picture is
byte-identical for a seed: change that order and every synthetic set changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .celeba import ATTR_NAMES

WIDTH, HEIGHT = 178, 218
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



@dataclass(frozen=True)
class Face:
    """One rendered picture and its annotations (landmarks in ``LANDMARK_NAMES`` order)."""

    image: Image.Image
    attrs: tuple[int, ...]
    identity: int
    landmarks: tuple[int, ...]


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



# ---------------------------------------------------------------------------------------------
# One picture, step by step. `t` is the identity's traits, `c` the picture's own choices, `g` its
# geometry (pixel positions); `d` draws on the picture.

def render_face(number: int, *, seed: int = 0, identities: int = 1) -> Face:
    """Draw picture ``number`` (1-based, the file number) of a set with ``identities`` identities."""
    rng = np.random.default_rng([seed, 0, number])
    identity = int(rng.integers(1, identities + 1))
    t = _identity_traits(seed, identity)
    c = _choose(rng, t)
    g = _place(rng, t, c)
    img = _background(rng)
    d = ImageDraw.Draw(img)
    _draw_body(d, rng, t, c, g)
    _draw_head_and_hair(d, t, g)
    _draw_facial_hair(d, t, c, g)
    _draw_eyes(d, t, c, g)
    _draw_nose(d, t, g)
    _draw_mouth(d, rng, t, c, g)
    _draw_accessories(d, rng, c, g)
    img = _photograph(img, rng, c)
    attrs = _attributes(t, c)
    landmarks = (g.lex, g.ley, g.rex, g.rey, g.nx, g.ny, g.lmx, g.lmy, g.rmx, g.rmy)
    return Face(img, attrs, identity, landmarks)


def _choose(rng: np.random.Generator, t: dict) -> SimpleNamespace:
    """What this picture shows beyond the identity: expression, accessories, make-up, shave."""
    r = rng.random
    male = t["male"]
    c = SimpleNamespace()
    c.smiling = r() < 0.48
    c.mouth_open = r() < (0.7 if c.smiling else 0.25)
    c.glasses = r() < 0.12
    c.hat = r() < 0.1
    c.narrow = r() < 0.1
    c.rosy = r() < (0.04 if male else 0.12)
    c.lipstick = t["lipstick_habit"] and r() < 0.9
    c.makeup = c.lipstick and r() < 0.6
    c.earrings = (not male) and r() < 0.3
    c.necklace = (not male) and r() < 0.15
    c.necktie = male and r() < 0.12
    c.blurry = r() < 0.05
    c.stubble = male and not t["full_beard"] and r() < 0.25
    shaved = r() < 0.15  # a male identity sometimes appears shaved
    c.mustache = t["mustache"] and not shaved
    c.goatee = t["goatee"] and not shaved
    c.full_beard = t["full_beard"] and not shaved
    c.bags = r() < 0.2
    c.high_cheek = r() < (0.75 if c.smiling else 0.15)
    return c


def _place(rng: np.random.Generator, t: dict, c: SimpleNamespace) -> SimpleNamespace:
    """Geometry, all relative to the jittered face offset (dx, dy); landmarks are exact pixels."""
    g = SimpleNamespace()
    dx, dy = int(rng.integers(-3, 4)), int(rng.integers(-3, 4))
    j = lambda k=2: int(rng.integers(-k, k + 1))  # noqa: E731 - per-landmark jitter
    n = NOMINAL_LANDMARKS
    eye_dy, mouth_dy = dy + j(), dy + j()  # pairs move together, then tilt by at most 2 px
    g.lex, g.ley = n[0] + dx + j(), n[1] + eye_dy + j(1)
    g.rex, g.rey = n[2] + dx + j(), n[3] + eye_dy + j(1)
    g.nx, g.ny = n[4] + dx + j(), n[5] + dy + j()
    g.lmx, g.lmy = n[6] + dx + j() - (1 if t["big_lips"] else 0), n[7] + mouth_dy + j(1)
    g.rmx, g.rmy = n[8] + dx + j() + (1 if t["big_lips"] else 0), n[9] + mouth_dy + j(1)
    if c.smiling:  # a smile lifts the corners a little
        g.lmy -= 1
        g.rmy -= 1
    g.cx, g.ey = 89 + dx, 111 + dy
    g.mx, g.my = (g.lmx + g.rmx) // 2, (g.lmy + g.rmy) // 2
    g.hw = 47 + int(rng.integers(-2, 3)) + (5 if t["chubby"] else 0) - (3 if t["oval"] else 0)
    g.head_t = g.ey - 53 - int(rng.integers(0, 3)) - (2 if t["oval"] else 0)
    g.chin = g.my + 30 + (3 if t["oval"] else 0)
    g.head_l, g.head_r = g.cx - g.hw, g.cx + g.hw
    g.hairline = g.ey - (38 if t["receding"] else 30)
    return g


def _background(rng: np.random.Generator) -> Image.Image:
    """A vertical gradient between two random colours."""
    top = rng.integers(30, 235, size=3)
    bottom = np.clip(top + rng.integers(-70, 71, size=3), 0, 255)
    ramp = np.linspace(0.0, 1.0, HEIGHT, dtype=np.float32)[:, None, None]
    bg = top * (1 - ramp) + bottom * ramp
    return Image.fromarray(np.broadcast_to(bg, (HEIGHT, WIDTH, 3)).astype(np.uint8), "RGB")


def _draw_body(d: ImageDraw.ImageDraw, rng: np.random.Generator, t: dict, c: SimpleNamespace,
               g: SimpleNamespace) -> None:
    """Clothes, long hair behind the head, neck (tie, necklace), ears (earrings)."""
    skin, hair_rgb, cx, chin, ey = t["skin"], t["hair_rgb"], g.cx, g.chin, g.ey
    clothes = tuple(int(v) for v in rng.integers(20, 230, size=3))
    d.ellipse((cx - 80, chin + 8, cx + 80, chin + 110), fill=clothes)
    if t["long_hair"]:
        d.rounded_rectangle((g.head_l - 9, g.head_t - 10, g.head_r + 9, chin + 22), radius=30, fill=hair_rgb)
    elif t["hair"] != "bald":
        d.ellipse((g.head_l - 6, g.head_t - 12, g.head_r + 6, ey + 12), fill=hair_rgb)
    d.rectangle((cx - 17, chin - 20, cx + 17, chin + 16), fill=_shade(skin, 0.9))
    if c.necktie:
        tie = _jitter(rng, (150, 30, 40), 40)
        d.polygon([(cx - 5, chin + 12), (cx + 5, chin + 12), (cx + 7, HEIGHT), (cx - 7, HEIGHT)], fill=tie)
    if c.necklace:
        d.arc((cx - 19, chin - 14, cx + 19, chin + 16), 20, 160, fill=(222, 186, 70), width=3)
    for ex0 in (g.head_l - 6, g.head_r - 6):
        d.ellipse((ex0, ey - 6, ex0 + 12, ey + 20), fill=_shade(skin, 0.93))
    if c.earrings:
        for ex0 in (g.head_l - 1, g.head_r + 1):
            d.ellipse((ex0 - 3, ey + 20, ex0 + 3, ey + 26), fill=(230, 196, 80))


def _draw_head_and_hair(d: ImageDraw.ImageDraw, t: dict, g: SimpleNamespace) -> None:
    """The head, then the hair cap (upper half ellipse whose flat lower edge is the hairline)."""
    skin, hair_rgb = t["skin"], t["hair_rgb"]
    head_l, head_r, head_t, hairline = g.head_l, g.head_r, g.head_t, g.hairline
    d.ellipse((head_l, head_t, head_r, g.chin), fill=skin)
    if t["double_chin"]:
        d.arc((g.cx - 22, g.chin - 14, g.cx + 22, g.chin + 4), 30, 150, fill=_shade(skin, 0.8), width=2)
    if t["hair"] == "bald":
        return
    d.chord((head_l - 6, head_t - 14, head_r + 6, 2 * hairline - (head_t - 14)), 180, 360, fill=hair_rgb)
    if t["sideburns"]:
        for x0 in (head_l + 1, head_r - 8):
            d.rectangle((x0, hairline - 2, x0 + 7, g.ey + 16), fill=hair_rgb)
    if t["bangs"]:
        pts = [(head_l + 6, hairline - 4)]
        for k in range(9):
            x = head_l + 10 + k * (2 * g.hw - 20) / 8
            pts.append((x, g.ey - 22 - (k % 2) * 6))
        pts.append((head_r - 6, hairline - 4))
        d.polygon(pts, fill=hair_rgb)


def _draw_facial_hair(d: ImageDraw.ImageDraw, t: dict, c: SimpleNamespace, g: SimpleNamespace) -> None:
    """Stubble, beard, goatee, mustache (males only), before the mouth so the lips stay on top."""
    beard_rgb, mx, my, chin = t["beard_rgb"], g.mx, g.my, g.chin
    if c.stubble:
        d.chord((g.head_l, g.head_t, g.head_r, chin), 22, 158, fill=_shade(t["skin"], 0.96))
    if c.full_beard:
        d.chord((g.head_l, g.head_t, g.head_r, chin + 2), 20, 160, fill=beard_rgb)
    if c.goatee:
        d.chord((mx - 14, my + 4, mx + 14, chin + 1), 0, 180, fill=beard_rgb)
        d.rectangle((mx - 14, my + 7, mx + 14, (my + 4 + chin + 1) // 2), fill=beard_rgb)
    if c.mustache:
        d.polygon([(g.lmx, my - 1), (mx - 6, my - 10), (mx + 6, my - 10), (g.rmx, my - 1), (mx, my - 4)],
                  fill=beard_rgb)


def _draw_eyes(d: ImageDraw.ImageDraw, t: dict, c: SimpleNamespace, g: SimpleNamespace) -> None:
    """Cheeks, eyes (make-up, bags, iris centred on the landmark pixel), brows."""
    skin, hair_rgb = t["skin"], t["hair_rgb"]
    if c.rosy:
        for ex0 in (g.lex - 2, g.rex + 2):
            d.ellipse((ex0 - 8, g.ny + 1, ex0 + 8, g.ny + 14), fill=_mix(skin, (232, 112, 120), 0.4))
    bald = t["hair"] == "bald"
    brow_rgb = _shade(hair_rgb, 0.8) if not bald and t["hair"] != "blond" else _shade(skin, 0.55)
    eh = 2 if c.narrow else 4
    for (ex, eyy) in ((g.lex, g.ley), (g.rex, g.rey)):
        if c.makeup:
            d.ellipse((ex - 9, eyy - eh - 4, ex + 9, eyy + 1), fill=_mix(skin, (120, 80, 150), 0.35))
        if c.bags:
            d.arc((ex - 7, eyy - 2, ex + 7, eyy + eh + 5), 20, 160, fill=_shade(skin, 0.8), width=1)
        d.ellipse((ex - 7, eyy - eh, ex + 7, eyy + eh), fill=(244, 242, 236), outline=_shade(skin, 0.5))
        d.ellipse((ex - 3, eyy - 3, ex + 3, eyy + 3), fill=t["eye_rgb"])
        d.ellipse((ex - 1, eyy - 1, ex + 1, eyy + 1), fill=(10, 10, 10))
        arch = 5 if t["arched"] else 2
        d.line([(ex - 9, eyy - 10), (ex, eyy - 11 - arch), (ex + 9, eyy - 10)], fill=brow_rgb,
               width=4 if t["bushy"] else 2, joint="curve")


def _draw_nose(d: ImageDraw.ImageDraw, t: dict, g: SimpleNamespace) -> None:
    """Shaded ridge, nostrils, and the tip drawn centred on the landmark pixel."""
    skin, nx, ny = t["skin"], g.nx, g.ny
    nw = 8 if t["big_nose"] else 5
    d.polygon([(nx, g.ey + 4), (nx - nw, ny + 1), (nx + nw, ny + 1)], fill=_shade(skin, 0.92))
    for sx in (-1, 1):
        d.ellipse((nx + sx * (nw - 1) - 2, ny, nx + sx * (nw - 1) + 2, ny + 3), fill=_shade(skin, 0.55))
    tip = 1 if t["pointy_nose"] else 2
    d.ellipse((nx - tip, ny - tip, nx + tip, ny + tip), fill=_shade(skin, 0.78))


def _draw_mouth(d: ImageDraw.ImageDraw, rng: np.random.Generator, t: dict, c: SimpleNamespace,
                g: SimpleNamespace) -> None:
    """The mouth: its corners are exactly the landmark pixels L and R."""
    skin, mx, my = t["skin"], g.mx, g.my
    lip = _jitter(rng, (192, 40, 62), 10) if c.lipstick else (int(skin[0] * 0.72), skin[1] // 2, skin[2] // 2)
    lip_w = 4 if t["big_lips"] else 3
    L, R = (g.lmx, g.lmy), (g.rmx, g.rmy)
    if c.smiling and c.mouth_open:
        upper = _bezier(L, (mx, my + 4), R)
        lower = _bezier(L, (mx, my + 18), R)
        d.polygon(upper + lower[::-1], fill=MOUTH_INSIDE)
        d.polygon(upper + _bezier(L, (mx, my + 8), R)[::-1], fill=TEETH)
        d.line(upper, fill=lip, width=lip_w - 1, joint="curve")
        d.line(lower, fill=lip, width=lip_w, joint="curve")
    elif c.smiling:
        d.line(_bezier(L, (mx, my + 12), R), fill=lip, width=lip_w + 1, joint="curve")
    elif c.mouth_open:
        d.ellipse((g.lmx + 3, my - 3, g.rmx - 3, my + 5), fill=MOUTH_INSIDE, outline=lip, width=2)
        d.line([L, (g.lmx + 4, my)], fill=lip, width=2)
        d.line([(g.rmx - 4, my), R], fill=lip, width=2)
    else:
        d.line(_bezier(L, (mx, my + 1), R), fill=lip, width=lip_w, joint="curve")


def _draw_accessories(d: ImageDraw.ImageDraw, rng: np.random.Generator, c: SimpleNamespace,
                      g: SimpleNamespace) -> None:
    """Glasses over the eyes, a hat over the head."""
    lex, ley, rex, rey = g.lex, g.ley, g.rex, g.rey
    if c.glasses:
        for (ex, eyy) in ((lex, ley), (rex, rey)):
            d.ellipse((ex - 13, eyy - 10, ex + 13, eyy + 10), outline=GLASSES_COLOR, width=3)
        d.line([(lex + 13, ley), (rex - 13, rey)], fill=GLASSES_COLOR, width=4)
        d.line([(lex - 13, ley), (g.head_l - 2, ley - 3)], fill=GLASSES_COLOR, width=2)
        d.line([(rex + 13, rey), (g.head_r + 2, rey - 3)], fill=GLASSES_COLOR, width=2)
    if c.hat:
        hat_rgb = _jitter(rng, HAT_COLORS[int(rng.integers(len(HAT_COLORS)))], 10)
        d.rounded_rectangle((g.head_l - 2, g.head_t - 26, g.head_r + 2, g.head_t + 18), radius=14, fill=hat_rgb)
        d.ellipse((g.head_l - 16, g.head_t + 10, g.head_r + 16, g.head_t + 24), fill=_shade(hat_rgb, 0.85))


def _photograph(img: Image.Image, rng: np.random.Generator, c: SimpleNamespace) -> Image.Image:
    """Photographic touches: soften edges (or blur hard), sensor noise, a side-lighting ramp."""
    img = img.filter(ImageFilter.GaussianBlur(2.2) if c.blurry else ImageFilter.BoxBlur(1))
    arr = np.asarray(img).astype(np.int16)
    oy, ox = (int(v) for v in rng.integers(0, _NOISE_MARGIN, size=2))
    arr += _noise_tile()[oy:oy + HEIGHT, ox:ox + WIDTH]
    light = np.rint(np.linspace(-1.0, 1.0, WIDTH) * rng.uniform(-18.0, 18.0)).astype(np.int16)
    arr += light[None, :, None]  # side lighting: one side a little brighter
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _attributes(t: dict, c: SimpleNamespace) -> tuple[int, ...]:
    """The 40 CelebA attributes (-1/+1, official order), true to what was drawn."""
    on = {
        "5_o_Clock_Shadow": c.stubble, "Arched_Eyebrows": t["arched"], "Attractive": t["attractive"],
        "Bags_Under_Eyes": c.bags, "Bald": t["hair"] == "bald", "Bangs": t["bangs"], "Big_Lips": t["big_lips"],
        "Big_Nose": t["big_nose"], "Black_Hair": t["hair"] == "black", "Blond_Hair": t["hair"] == "blond",
        "Blurry": c.blurry, "Brown_Hair": t["hair"] == "brown", "Bushy_Eyebrows": t["bushy"],
        "Chubby": t["chubby"], "Double_Chin": t["double_chin"], "Eyeglasses": c.glasses,
        "Goatee": c.goatee and not c.full_beard, "Gray_Hair": t["hair"] == "gray", "Heavy_Makeup": c.makeup,
        "High_Cheekbones": c.high_cheek, "Male": t["male"], "Mouth_Slightly_Open": c.mouth_open,
        "Mustache": c.mustache, "Narrow_Eyes": c.narrow, "No_Beard": not (c.goatee or c.full_beard),
        "Oval_Face": t["oval"], "Pale_Skin": t["pale"], "Pointy_Nose": t["pointy_nose"],
        "Receding_Hairline": t["receding"], "Rosy_Cheeks": c.rosy, "Sideburns": t["sideburns"],
        "Smiling": c.smiling, "Straight_Hair": t["straight"], "Wavy_Hair": t["wavy"],
        "Wearing_Earrings": c.earrings, "Wearing_Hat": c.hat, "Wearing_Lipstick": c.lipstick,
        "Wearing_Necklace": c.necklace, "Wearing_Necktie": c.necktie, "Young": t["young"],
    }
    return tuple(1 if on[name] else -1 for name in ATTR_NAMES)
