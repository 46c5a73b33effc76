"""Synthetic CelebA generator: on-disk layout, text formats, determinism, pictures true to labels."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastceleba.celeba import load_celeba
from fastceleba.errors import DataError
from fastceleba.faces import HAIR_COLORS, NOMINAL_LANDMARKS
from fastceleba.synth import (
    ATTR_FILE, ATTR_NAMES, IDENTITY_FILE, IMAGE_DIR, LANDMARKS_FILE, LANDMARK_NAMES, PARTITION_FILE,
    generate, num_identities, partition_counts,
)

REPO = Path(__file__).resolve().parents[1]
N, SEED = 128, 11  # 6 identities; this seed gives both sexes, all five hair kinds, beards, glasses
A = {name: i for i, name in enumerate(ATTR_NAMES)}
TEXT_FILES = (PARTITION_FILE, ATTR_FILE, IDENTITY_FILE, LANDMARKS_FILE)


@pytest.fixture(scope="module")
def celeba(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "celeba", N, seed=SEED, workers=1, progress=False)


def read_annotations(root: Path):
    """Parse the four files the way common CelebA readers do (whitespace split)."""
    attr_lines = (root / ATTR_FILE).read_text().splitlines()
    attrs = {ln.split()[0]: [int(v) for v in ln.split()[1:]] for ln in attr_lines[2:]}
    lmk_lines = (root / LANDMARKS_FILE).read_text().splitlines()
    lmks = {ln.split()[0]: [int(v) for v in ln.split()[1:]] for ln in lmk_lines[2:]}
    ident = {ln.split()[0]: int(ln.split()[1]) for ln in (root / IDENTITY_FILE).read_text().splitlines()}
    return attrs, lmks, ident


# ---- pixel probes: mean colour of a small patch of the decoded JPEG -----------------------------

def patch(img: np.ndarray, x: int, y: int, r: int = 2) -> np.ndarray:
    return img[y - r:y + r + 1, x - r:x + r + 1].reshape(-1, 3).mean(axis=0)


def luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def dist(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


def picture_problems(img: np.ndarray, a: list[int], lm: list[int]) -> list[str]:
    """Every way the picture contradicts its labels (empty when it is true to them)."""
    on = {name: a[i] == 1 for name, i in A.items()}
    lex, ley, rex, rey, nx, ny, lmx, lmy, rmx, rmy = lm
    mx, my = (lmx + rmx) // 2, (lmy + rmy) // 2
    cheek = patch(img, lex - 4, ley + 16)
    bad = []

    # Glasses: the dark bridge crosses the midpoint between the eyes, else that is plain skin.
    bridge = luma(patch(img, (lex + rex) // 2, (ley + rey) // 2, 1)) / luma(cheek)
    if (on["Eyeglasses"] and bridge > 0.6) or (not on["Eyeglasses"] and bridge < 0.85):
        bad.append(f"Eyeglasses={on['Eyeglasses']} but bridge/cheek luma {bridge:.2f}")

    # Hair: exactly one of the five; under no hat, the top of the head shows it (skin when bald).
    hair = [h for h in ("Bald", "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair") if on[h]]
    if len(hair) != 1:
        bad.append(f"hair attributes {hair}")
    elif not on["Wearing_Hat"]:
        top = patch(img, (lex + rex) // 2, (ley + rey) // 2 - 45)
        if hair[0] == "Bald":
            if dist(top, cheek) > 32:
                bad.append(f"Bald but head top {top.round()} is not skin {cheek.round()}")
        else:
            nearest = min(HAIR_COLORS, key=lambda h: dist(top, HAIR_COLORS[h]))
            if f"{nearest.capitalize()}_Hair" != hair[0]:
                bad.append(f"{hair[0]} but head top {top.round()} looks {nearest}")

    # Skin: pale faces are much lighter than any other tone.
    if on["Pale_Skin"] != (luma(cheek) > 212):
        bad.append(f"Pale_Skin={on['Pale_Skin']} but cheek luma {luma(cheek):.0f}")

    # Facial hair: only on men; the chin (beard, goatee) and the upper lip (mustache) show it.
    if (on["Mustache"] or on["Goatee"] or not on["No_Beard"]) and not on["Male"]:
        bad.append("facial hair on a woman")
    chin = dist(patch(img, mx, my + 16), cheek)
    if (not on["No_Beard"] and chin < 40) or (on["No_Beard"] and chin > 32):
        bad.append(f"No_Beard={on['No_Beard']} but chin is {chin:.0f} from skin")
    if on["Goatee"] and on["No_Beard"]:
        bad.append("Goatee without a beard")
    lip = dist(patch(img, mx, my - 7, 1), cheek)
    if (on["Mustache"] and lip < 40) or (not on["Mustache"] and on["No_Beard"] and lip > 32):
        bad.append(f"Mustache={on['Mustache']} but upper lip is {lip:.0f} from skin")

    if on["Blurry"]:  # the blur smears the thin mouth lines and the glasses bridge
        return [b for b in bad if not b.startswith("Eyeglasses")]
    # Mouth: a smile dips below the corners; an open neutral mouth is dark between them.
    below = dist(patch(img, mx, my + 6, 1), cheek)
    if on["Smiling"] and below < 40:
        bad.append(f"Smiling but below the corners is {below:.0f} from skin")
    if not on["Smiling"] and not on["Mouth_Slightly_Open"] and on["No_Beard"] and below > 32:
        bad.append(f"closed neutral mouth but below the corners is {below:.0f} from skin")
    if not on["Smiling"] and on["Mouth_Slightly_Open"] and luma(patch(img, mx, my + 1, 1)) > 90:
        bad.append("Mouth_Slightly_Open but the mouth is not dark")
    return bad


# ---- tests -------------------------------------------------------------------------------------

def test_images_are_celeba_sized_rgb_jpegs(celeba):
    files = sorted(os.listdir(celeba / IMAGE_DIR))
    assert files == [f"{k:06d}.jpg" for k in range(1, N + 1)]  # no temp files left behind
    sizes = []
    for name in files:
        path = celeba / IMAGE_DIR / name
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (178, 218))
        sizes.append(path.stat().st_size)
    assert 5_000 <= np.mean(sizes) <= 15_000, "real aligned CelebA JPEGs are ~5-15 KB"
    assert 3_000 <= min(sizes) and max(sizes) <= 20_000


def test_text_files_match_official_layout(celeba):
    names = [f"{k:06d}.jpg" for k in range(1, N + 1)]
    raw = {f: (celeba / f).read_bytes() for f in TEXT_FILES}
    for f, data in raw.items():
        assert data.endswith(b"\n") and b"\r" not in data and b"\t" not in data, f

    part = raw[PARTITION_FILE].decode("ascii").splitlines()
    assert [ln.split(" ")[0] for ln in part] == names
    labels = [int(ln.split(" ")[1]) for ln in part]
    n_train, n_valid, n_test = partition_counts(N, (0.8, 0.1, 0.1))
    assert (n_train, n_valid, n_test) == (102, 13, 13)
    assert labels == [0] * n_train + [1] * n_valid + [2] * n_test  # contiguous, as official

    attr = raw[ATTR_FILE].decode("ascii").splitlines()
    assert attr[0] == str(N)
    assert attr[1] == " ".join(ATTR_NAMES) + " "  # the official header has a trailing space
    assert len(ATTR_NAMES) == 40 and ATTR_NAMES[0] == "5_o_Clock_Shadow" and ATTR_NAMES[-1] == "Young"
    assert ATTR_NAMES[A["Smiling"]] == "Smiling" and A["Smiling"] == 31 and A["Male"] == 20
    row = re.compile(r"^\d{6}\.jpg( (-1| 1)){40}$")
    assert len(attr) == N + 2 and all(row.match(ln) for ln in attr[2:])
    assert [ln[:10] for ln in attr[2:]] == names

    lmk = raw[LANDMARKS_FILE].decode("ascii").splitlines()
    assert lmk[0] == str(N) and lmk[1] == " ".join(LANDMARK_NAMES)
    assert lmk[1] == ("lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
                      "leftmouth_x leftmouth_y rightmouth_x rightmouth_y")
    for name, ln in zip(names, lmk[2:], strict=True):
        values = [int(v) for v in ln.split()[1:]]
        assert ln == name + " " + "".join(f"{v:5d}" for v in values)  # "000001.jpg    69  109 ..."

    ident = raw[IDENTITY_FILE].decode("ascii").splitlines()
    assert len(ident) == N and all(re.match(r"^\d{6}\.jpg [1-9]\d*$", ln) for ln in ident)
    assert [ln.split(" ")[0] for ln in ident] == names


def test_project_parser_reads_it(celeba):
    """fastceleba.celeba (what the shard tool uses) reads every file and agrees with a plain split."""
    ds = load_celeba(celeba)
    attrs, lmks, ident = read_annotations(celeba)
    assert ds.images == [f"{k:06d}.jpg" for k in range(1, N + 1)]
    assert ds.number == {name: k for k, name in enumerate(ds.images, start=1)}
    assert {n: v.tolist() for n, v in ds.attrs.items()} == attrs
    assert {n: v.tolist() for n, v in ds.landmarks.items()} == lmks
    assert ds.identity == ident
    assert sorted(ds.partition.values()) == [0] * 102 + [1] * 13 + [2] * 13


def test_custom_partition_and_counts(tmp_path):
    root = generate(tmp_path, 20, seed=1, partition=(0.5, 0.25, 0.25), workers=1, progress=False)
    labels = [ln.split()[1] for ln in (root / PARTITION_FILE).read_text().splitlines()]
    assert labels == ["0"] * 10 + ["1"] * 5 + ["2"] * 5
    assert partition_counts(10, (1, 0, 0)) == (10, 0, 0)
    assert partition_counts(3, (0.34, 0.33, 0.33)) == (1, 1, 1)


def test_same_seed_byte_identical_whatever_the_worker_count(tmp_path):
    a = generate(tmp_path / "a", 40, seed=5, workers=1, progress=False)
    b = generate(tmp_path / "b", 40, seed=5, workers=2, progress=False)
    c = generate(tmp_path / "c", 40, seed=6, workers=1, progress=False)
    files = [IMAGE_DIR + "/" + f for f in sorted(os.listdir(a / IMAGE_DIR))] + list(TEXT_FILES)
    assert len(files) == 44
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / ATTR_FILE).read_bytes() != (c / ATTR_FILE).read_bytes()
    assert (a / IMAGE_DIR / "000001.jpg").read_bytes() != (c / IMAGE_DIR / "000001.jpg").read_bytes()


def test_pictures_are_true_to_their_labels(celeba):
    attrs, lmks, _ = read_annotations(celeba)
    problems, seen = {}, np.zeros(len(ATTR_NAMES), int)
    for name in sorted(attrs):
        img = np.asarray(Image.open(celeba / IMAGE_DIR / name), dtype=np.float64)
        bad = picture_problems(img, attrs[name], lmks[name])
        if bad:
            problems[name] = bad
        seen += np.array(attrs[name]) == 1
    assert not problems
    # The set is varied enough for the checks above to mean something.
    for attr in ("Eyeglasses", "Smiling", "Mouth_Slightly_Open", "Male", "Wearing_Hat", "No_Beard",
                 "Mustache", "Goatee", "Pale_Skin", "Bald", "Black_Hair", "Blond_Hair", "Brown_Hair",
                 "Gray_Hair"):
        assert 0 < seen[A[attr]] < N, attr


def test_probes_catch_wrong_labels(celeba):
    """The checks above can fail: flipping a label the picture shows is noticed."""
    attrs, lmks, _ = read_annotations(celeba)
    caught = 0
    for name in sorted(attrs):
        img = np.asarray(Image.open(celeba / IMAGE_DIR / name), dtype=np.float64)
        for attr in ("Eyeglasses", "Pale_Skin", "Smiling"):
            flipped = list(attrs[name])
            flipped[A[attr]] = -flipped[A[attr]]
            caught += bool(picture_problems(img, flipped, lmks[name]))
    assert caught >= 0.9 * 3 * N


def test_landmarks_near_nominal_and_drawn_there(celeba):
    attrs, lmks, _ = read_annotations(celeba)
    for name, lm in lmks.items():
        assert all(abs(v - nominal) <= 7 for v, nominal in zip(lm, NOMINAL_LANDMARKS)), (name, lm)
        assert all(0 <= x < 178 for x in lm[0::2]) and all(0 <= y < 218 for y in lm[1::2])
        if attrs[name][A["Blurry"]] == 1:
            continue
        img = np.asarray(Image.open(celeba / IMAGE_DIR / name), dtype=np.float64)
        # The pupil is a black dot drawn centred on each eye landmark.
        for x, y in ((lm[0], lm[1]), (lm[2], lm[3])):
            assert luma(img[y, x]) < 70, (name, x, y)
            assert luma(img[y, x]) < luma(patch(img, x, y, 2)), (name, x, y)


def test_identities_carry_fixed_traits(celeba):
    attrs, _, ident = read_annotations(celeba)
    assert set(ident.values()) <= set(range(1, num_identities(N) + 1))
    assert num_identities(N) == 6 and num_identities(200_000) == 10_000
    traits = [A[t] for t in ("Male", "Pale_Skin", "Bald", "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")]
    by_identity: dict[int, set] = {}
    for name, i in ident.items():
        by_identity.setdefault(i, set()).add(tuple(attrs[name][t] for t in traits))
    assert all(len(v) == 1 for v in by_identity.values())
    assert len(by_identity) >= 2


def test_refuses_non_empty_image_dir_unless_overwrite(tmp_path):
    root = generate(tmp_path, 12, seed=0, workers=1, progress=False)
    before = (root / ATTR_FILE).read_bytes()
    with pytest.raises(DataError, match=r"img_align_celeba.*overwrite"):
        generate(root, 5, seed=0, workers=1, progress=False)
    assert (root / ATTR_FILE).read_bytes() == before  # nothing touched

    generate(root, 5, seed=0, workers=1, progress=False, overwrite=True)
    assert sorted(os.listdir(root / IMAGE_DIR)) == [f"{k:06d}.jpg" for k in range(1, 6)]
    assert (root / ATTR_FILE).read_text().splitlines()[0] == "5"


@pytest.mark.parametrize("kwargs", [dict(num_images=0), dict(partition=(0.5, 0.5)),
                                    dict(partition=(0.8, 0.3, -0.1)), dict(workers=0), dict(seed=-1)])
def test_bad_arguments_raise_data_error(tmp_path, kwargs):
    args = dict(num_images=4, seed=0, workers=1, progress=False) | kwargs
    with pytest.raises(DataError):
        generate(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


def test_tool_runs_from_anywhere_and_reports_errors(tmp_path):
    tool = [sys.executable, str(REPO / "tools" / "make_synthetic.py")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # cwd outside the repo: the script must find the package itself when it is not installed.
    ok = subprocess.run(tool + ["out", "--num", "6", "--seed", "2", "--split", "0.5,0.5,0",
                                "--workers", "1", "--no-progress"],
                        cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "6 images" in ok.stdout and "images/s" in ok.stdout
    labels = [ln.split()[1] for ln in (tmp_path / "out" / PARTITION_FILE).read_text().splitlines()]
    assert labels == ["0"] * 3 + ["1"] * 3

    again = subprocess.run(tool + ["out", "--num", "6", "--no-progress"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and "overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
