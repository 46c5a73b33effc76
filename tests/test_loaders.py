"""make_loader: the batch contract, image agreement, epochs, ranks and bad input, for every kind.

All data are real: the session's synthetic CelebA (conftest: 240 images; train 192 in 4 shards of
<= 50, valid 24, test 24) sharded with JPEGs and 64x64 .rgb members.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastceleba.errors import DataError
from fastceleba.loaders import KINDS, batch_counts, make_loader
from fastceleba.shards import load_manifest, split_keys

ROOT = Path(__file__).resolve().parents[1]
# (kind, member) combinations that read shards; pil reads the image folder
SHARD_KINDS = [(k, m) for k in ("dali", "wds", "turbo", "cache") for m in ("jpg", "rgb")]
ALL = [("pil", "auto")] + SHARD_KINDS

# Agreement with the pil reference, as mean absolute difference per image in 1/255 units.
# .rgb members are made by the same PIL code as pil, and wds decodes JPEGs with the same
# libjpeg-turbo and resizes with that code: identical pixels. turbo/cache decode at DCT scale 1/2
# and DALI uses its own antialiased resampler: measured worst images 0.83/255 (turbo; 1.3 over
# sizes 32-128, crops and odd shapes) and 0.28/255 (DALI) on these faces. The bound 2/255 leaves
# room for that, yet is below what a one-pixel shift of the crop gives (>= 2.4/255, checked
# below), so a geometry or colour-order error cannot pass.
RESAMPLED_BOUND = 2.0


def nums_of(shards, split):
    return sorted(int(k.split(".")[0]) for k in split_keys(shards, split))


def epoch(loader):
    return list(loader)


def images_by_num(loader):
    out = {}
    for b in loader:
        for n, x, v in zip(b["num"].tolist(), b["image"], b["valid"].tolist()):
            if v:
                out[n] = x
    return out


# ---------------------------------------------------------------------------------------------
# The batch contract

@pytest.mark.parametrize("kind,member", ALL)
def test_batches_follow_the_contract(shards, kind, member):
    loader = make_loader(kind, shards, "train", 50, member=member)
    batches = epoch(loader)
    assert len(loader) == len(batches) == 4          # 192 = 3 x 50 + 42
    assert [b["image"].shape[0] for b in batches] == [50, 50, 50, 42]
    labels = {"image", "num", "valid"} | ({"attr", "ident"} if kind != "pil" else set())
    nums = []
    for b in batches:
        assert set(b) == labels
        x = b["image"]
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 64, 64) and x.device.type == "cpu"
        assert x.is_contiguous()  # the notebook's models flatten with .view()
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05
        assert b["num"].dtype == torch.int32 and b["num"].shape == (x.shape[0],)
        assert b["valid"].dtype == torch.bool and b["valid"].all()  # one rank: no padding
        if kind != "pil":
            assert b["attr"].dtype == torch.int8 and b["attr"].shape == (x.shape[0], 40)
            assert set(b["attr"].unique().tolist()) <= {-1, 1}
            assert b["ident"].dtype == torch.int32 and b["ident"].shape == (x.shape[0],)
        nums += b["num"].tolist()
    assert sorted(nums) == nums_of(shards, "train")  # the split, each image once


def test_labels_match_the_manifest_json(shards):
    """attr/ident in batches are the sample's own (checked against the shards' .json members)."""
    import tarfile

    info = {}
    for tar in sorted(Path(shards).glob("valid-*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".json"):
                    j = json.loads(t.extractfile(m).read())
                    info[j["num"]] = j
    names = load_manifest(shards)["attr_names"]
    for kind in ("dali", "wds", "turbo", "cache"):
        for b in make_loader(kind, shards, "valid", 7):
            for n, a, i in zip(b["num"].tolist(), b["attr"].tolist(), b["ident"].tolist()):
                assert a == [info[n]["attrs"][k] for k in names]
                assert i == info[n]["identity"]


def test_pil_reads_the_folder_in_natural_order(shards):
    nums = [n for b in make_loader("pil", shards, "train", 64, num_workers=0) for n in b["num"].tolist()]
    assert nums == nums_of(shards, "train")


# ---------------------------------------------------------------------------------------------
# Every loader gives the same picture for the same num

@pytest.fixture(scope="module")
def reference(shards):
    return images_by_num(make_loader("pil", shards, "valid", 8, num_workers=0))


@pytest.mark.parametrize("kind,member", SHARD_KINDS)
def test_images_agree_with_pil_pixel_by_pixel(shards, reference, kind, member):
    got = images_by_num(make_loader(kind, shards, "valid", 8, member=member, num_workers=1))
    assert got.keys() == reference.keys()
    mad = {n: float((got[n] - reference[n]).abs().mean()) * 255 for n in reference}
    if member == "rgb" or kind == "wds":
        assert max(mad.values()) < 1e-3, "same PIL code: the pixels must be identical"
    else:
        assert max(mad.values()) < RESAMPLED_BOUND, mad


def test_bound_catches_a_one_pixel_shift(reference):
    shifted = [float((x[:, :, 1:] - x[:, :, :-1]).abs().mean()) * 255 for x in reference.values()]
    assert min(shifted) > RESAMPLED_BOUND  # measured >= 2.4/255 on these faces


@pytest.mark.parametrize("kind", ["turbo", "dali", "wds"])
def test_crop_option_agrees_with_pil(shards, kind):
    ref = images_by_num(make_loader("pil", shards, "valid", 8, crop=148, num_workers=0))
    got = images_by_num(make_loader(kind, shards, "valid", 8, crop=148, num_workers=1))
    mad = [float((got[n] - ref[n]).abs().mean()) * 255 for n in ref]
    assert max(mad) < RESAMPLED_BOUND
    plain = images_by_num(make_loader("pil", shards, "valid", 8, num_workers=0))
    assert min(float((plain[n] - ref[n]).abs().mean()) * 255 for n in ref) > RESAMPLED_BOUND  # crop did something


# Shapes a user's folder may hold: CelebA's portrait, landscape, square, odd sides, small.
SHAPES = [(178, 218), (218, 178), (200, 200), (177, 213), (97, 131), (301, 161)]  # (w, h)


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory):
    """12 faces in the six SHAPES, all in train, JPEG-only shards; one carries an EXIF
    orientation tag (rotate 90) that every loader must ignore as PIL does."""
    from PIL import Image

    from fastceleba.shardwriter import ShardOptions, write_shards
    from fastceleba.synth import generate

    root = tmp_path_factory.mktemp("odd")
    generate(root / "celeba", 12, seed=4, progress=False, partition=(1.0, 0.0, 0.0), workers=1)
    for k, path in enumerate(sorted((root / "celeba" / "img_align_celeba").glob("*.jpg"))):
        img = Image.open(path).convert("RGB").resize(SHAPES[k % len(SHAPES)], Image.BICUBIC)
        exif = Image.Exif()
        if k == 0:
            exif[0x0112] = 6
        img.save(path, quality=90, exif=exif)
    write_shards(root / "celeba", root / "shards", ShardOptions(shard_size=5), progress=False)
    return root / "shards"


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_array_transform_is_torchvisions_pixel_for_pixel(mode):
    """resize_crop_array (shard writer, wds) makes torchvision's PIL calls itself: the same pixels as
    resize_crop (the notebook's torchvision transforms, the pil baseline) at every geometry."""
    import numpy as np
    from PIL import Image

    from fastceleba.transforms import resize_crop, resize_crop_array

    rng = np.random.default_rng(0)
    for w, h in SHAPES + [(64, 64), (65, 300)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        for size in (32, 48, 64, 128):
            for crop in (None, 60, 90, min(w, h), min(w, h) + 3):
                expected = np.asarray(resize_crop(img.convert("RGB"), size, crop))
                assert np.array_equal(resize_crop_array(img, size, crop), expected), (w, h, size, crop)


@pytest.mark.parametrize("size", [32, 48, 64, 128])
@pytest.mark.parametrize("crop", [None, 90])
def test_every_geometry_agrees_with_pil(odd_shards, size, crop):
    """Off the default geometry too: sizes, crops, portrait/landscape/square/odd images, EXIF."""
    ref = images_by_num(make_loader("pil", odd_shards, "train", 6, size=size, crop=crop, num_workers=0))
    for kind in ("dali", "turbo", "cache", "wds"):
        got = images_by_num(make_loader(kind, odd_shards, "train", 6, size=size, crop=crop, member="jpg",
                                        num_workers=1))
        mad = {n: float((got[n] - ref[n]).abs().mean()) * 255 for n in ref}
        assert max(mad.values()) < RESAMPLED_BOUND, (kind, mad)
        if kind == "wds":  # the same libjpeg-turbo decode and PIL resize: identical pixels
            assert max(mad.values()) < 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_a_crop_larger_than_an_image_is_one_line(odd_shards, kind):
    member = {} if kind == "pil" else {"member": "jpg"}
    with pytest.raises(DataError, match=r"the image is 97x131, smaller than --crop 148"):
        for _ in make_loader(kind, odd_shards, "train", 6, crop=148, num_workers=0 if kind == "pil" else 1,
                             **member):
            pass


@pytest.mark.parametrize("kind,member", [("pil", "auto"), ("dali", "jpg"), ("wds", "rgb"), ("turbo", "jpg"),
                                         ("cache", "rgb")])
def test_flip_mirrors_some_images_reproducibly(shards, kind, member):
    plain = images_by_num(make_loader(kind, shards, "valid", 8, member=member, num_workers=1))
    loader = make_loader(kind, shards, "valid", 8, member=member, num_workers=1, flip=True, seed=3)
    flipped = images_by_num(loader)
    mirrored = [n for n in plain if torch.equal(flipped[n], plain[n].flip(-1))]
    same = [n for n in plain if torch.equal(flipped[n], plain[n])]
    assert len(mirrored) + len(same) == len(plain)
    assert 0 < len(mirrored) < len(plain)
    loader.set_epoch(0)
    again = images_by_num(loader)
    assert all(torch.equal(again[n], flipped[n]) for n in plain)


# ---------------------------------------------------------------------------------------------
# Epochs

@pytest.mark.parametrize("kind", KINDS)
def test_set_epoch_reproduces_the_order(shards, kind):
    member = "auto" if kind == "pil" else "jpg"
    a = make_loader(kind, shards, "train", 32, shuffle=True, seed=7, member=member, num_workers=1)
    orders = [[n for b in a for n in b["num"].tolist()] for _ in range(3)]  # epochs 0, 1, 2
    assert orders[0] != orders[1] != orders[2]
    assert all(sorted(o) == nums_of(shards, "train") for o in orders)
    b = make_loader(kind, shards, "train", 32, shuffle=True, seed=7, member=member, num_workers=1)
    b.set_epoch(2)
    assert [n for batch in b for n in batch["num"].tolist()] == orders[2]
    c = make_loader(kind, shards, "train", 32, shuffle=True, seed=8, member=member, num_workers=1)
    assert [n for batch in c for n in batch["num"].tolist()] != orders[0]


@pytest.mark.parametrize("kind", KINDS)
def test_an_epoch_started_at_a_batch_gives_the_rest_of_that_epoch(shards, kind):
    """set_epoch(e, start_batch=k): a run resumed mid-epoch gets exactly the batches it had left, flips
    included, on two ranks, and the epoch after it is whole again."""
    member = "auto" if kind == "pil" else "jpg"

    def batches(loader):
        return [(b["num"].tolist(), b["image"].sum((1, 2, 3)).tolist()) for b in loader]

    for rank in (0, 1):
        kw = dict(shuffle=True, seed=3, member=member, num_workers=1, flip=True, drop_last=True, rank=rank,
                  world_size=2)
        a = make_loader(kind, shards, "train", 16, **kw)
        a.set_epoch(1)
        whole = batches(a)
        b = make_loader(kind, shards, "train", 16, **kw)
        b.set_epoch(1, start_batch=4)
        assert batches(b) == whole[4:] and len(whole) == len(b) == 6
        assert len(batches(b)) == 6  # epoch 2: from its first batch
    with pytest.raises(ValueError):
        b.set_epoch(0, start_batch=len(b))


def test_unshuffled_epochs_repeat(shards):
    loader = make_loader("dali", shards, "train", 40, member="jpg")  # one pipeline serves all epochs
    first = [n for b in loader for n in b["num"].tolist()]
    assert [n for b in loader for n in b["num"].tolist()] == first
    half = iter(loader)
    next(half)  # an abandoned epoch must not disturb the next one
    del half
    assert [n for b in loader for n in b["num"].tolist()] == first


@pytest.mark.parametrize("member", ["jpg", "rgb"])
def test_dali_follows_the_plan_with_one_pipeline(shards, member):
    """DALI is fed the epoch plan: the very order, rank slice and flips of turbo (which reads the
    plan directly), epoch after epoch, from the one pipeline it built first."""
    for rank in (0, 1):
        kw = dict(member=member, shuffle=True, flip=True, seed=5, rank=rank, world_size=2, num_workers=1)
        dali, turbo = make_loader("dali", shards, "train", 30, **kw), make_loader("turbo", shards, "train", 30, **kw)
        first_iter = None
        for _ in range(3):
            for a, b in zip(epoch(dali), epoch(turbo), strict=True):
                assert torch.equal(a["num"], b["num"]) and torch.equal(a["valid"], b["valid"])
                assert torch.equal(a["attr"], b["attr"]) and torch.equal(a["ident"], b["ident"])
                mad = (a["image"] - b["image"]).abs().flatten(1).mean(1) * 255
                assert mad.max() < RESAMPLED_BOUND  # flipped alike: a mirrored face differs far more
            first_iter = first_iter or dali._iter
            assert dali._iter is first_iter  # never rebuilt


def test_dali_close_releases_the_pipeline_and_the_next_epoch_rebuilds_it(shards):
    loader = make_loader("dali", shards, "valid", 8, member="jpg", shuffle=True, seed=1)
    loader.set_epoch(3)
    first = epoch(loader)
    loader.close()
    assert loader._iter is None
    loader.set_epoch(3)
    for a, b in zip(first, epoch(loader), strict=True):
        assert torch.equal(a["num"], b["num"]) and torch.equal(a["image"], b["image"])


def test_dali_flips_differ_between_ranks(shards):
    """The k-th image of each rank is not flipped alike (one shared coin-flip seed did that)."""
    flips = []
    for rank in (0, 1):
        plain = make_loader("dali", shards, "train", 96, member="rgb", rank=rank, world_size=2)
        flipped = make_loader("dali", shards, "train", 96, member="rgb", rank=rank, world_size=2, flip=True)
        a, b = next(iter(plain))["image"], next(iter(flipped))["image"]
        flips.append([not torch.equal(x, y) for x, y in zip(a, b)])
    assert 0 < sum(flips[0]) < 96 and flips[0] != flips[1]


@pytest.mark.parametrize("kind,member", [("turbo", "jpg"), ("turbo", "rgb"), ("wds", "jpg")])
def test_uint8_transfer_gives_the_same_batches(shards, kind, member):
    """The GPU route (uint8 HWC crosses the bus, converted on the device) run on the CPU: the same
    values, layout and contiguity as the float route the CPU takes."""
    kw = dict(member=member, shuffle=True, flip=True, seed=2, num_workers=1)
    floats = epoch(make_loader(kind, shards, "valid", 10, **kw))
    loader = make_loader(kind, shards, "valid", 10, **kw)
    assert not loader.u8_transfer  # a CPU device: the loader's threads convert
    loader.u8_transfer = True      # what a cuda device chooses
    for a, b in zip(floats, epoch(loader), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert b["image"].is_contiguous() and b["image"].dtype == torch.float32


def test_a_cache_view_shares_the_decoded_split(shards):
    train = make_loader("cache", shards, "train", 32, member="jpg", shuffle=True, flip=True, drop_last=True,
                        rank=1, world_size=2, num_workers=1)
    plain = train.view(batch_size=50)
    assert plain.images.data_ptr() == train.images.data_ptr()  # no second copy, no second decode
    fresh = make_loader("cache", shards, "train", 50, member="jpg", rank=1, world_size=2, num_workers=1)
    for a, b in zip(epoch(plain), epoch(fresh), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(epoch(train)) == len(train) == 3  # the original keeps its own options


# ---------------------------------------------------------------------------------------------
# Ranks (in-process); the real two-process launch is below

def run_ranks(shards, kind, world, batch, drop_last, split="train", **kw):
    per_rank = []
    for rank in range(world):
        loader = make_loader(kind, shards, split, batch, rank=rank, world_size=world, drop_last=drop_last,
                             shuffle=True, seed=1, num_workers=2, **kw)
        loader.set_epoch(1)
        batches = epoch(loader)
        assert len(batches) == len(loader)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("kind", ["dali", "wds", "cache", "turbo", "pil"])
@pytest.mark.parametrize("world,batch", [(2, 50), (3, 16), (5, 7)])
def test_ranks_split_the_epoch_exactly_once(shards, kind, world, batch):
    member = {} if kind == "pil" else {"member": "jpg"}
    per_rank = run_ranks(shards, kind, world, batch, False, **member)
    n = len(nums_of(shards, "train"))
    assert len({len(b) for b in per_rank}) == 1                        # all ranks step together
    shapes = [[x["image"].shape[0] for x in b] for b in per_rank]
    assert all(s == shapes[0] for s in shapes)                          # same batch sizes too
    assert len(per_rank[0]) == batch_counts(n, batch, world, False)[0]
    seen = collections.Counter(v for b in per_rank for x in b for v in x["num"][x["valid"]].tolist())
    assert sorted(seen) == nums_of(shards, "train") and max(seen.values()) == 1
    padding = sum(int((~x["valid"]).sum()) for b in per_rank for x in b)
    assert padding == world * -(-n // world) - n


@pytest.mark.parametrize("kind", ["dali", "wds", "cache", "turbo"])
@pytest.mark.parametrize("world,batches", [(3, 4), (5, 2)])  # 192/3 = 64 -> 4 x 16; 38 or 39 -> 2 x 16
def test_drop_last_gives_full_valid_batches(shards, kind, world, batches):
    per_rank = run_ranks(shards, kind, world, 16, True, member="rgb")
    assert {len(b) for b in per_rank} == {batches}
    nums = [v for b in per_rank for x in b for v in x["num"].tolist()]
    assert all(x["image"].shape[0] == 16 and x["valid"].all() for b in per_rank for x in b)
    assert len(nums) == len(set(nums)) == world * batches * 16


def test_two_ranks_are_disjoint_on_a_single_shard_split(shards):
    # valid has one tar: shard-level splitting could not serve two ranks; sample-level does
    for kind in ("wds", "dali"):
        a, b = run_ranks(shards, kind, 2, 5, False, split="valid", member="rgb")
        na = {v for x in a for v in x["num"][x["valid"]].tolist()}
        nb = {v for x in b for v in x["num"][x["valid"]].tolist()}
        assert not na & nb and sorted(na | nb) == nums_of(shards, "valid")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_launch_two_processes(shards, tmp_path):
    """Two real processes under `accelerate launch`: each rank's loader, gathered across ranks."""
    out = tmp_path / "ranks.json"
    # --multi_gpu with ACCELERATE_USE_CPU=1: torchrun-style processes on a gloo (CPU) group
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           str(ROOT / "tests" / "dist_loader_check.py"), "--data", str(shards), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    expected = nums_of(shards, "train")
    for kind, res in report["kinds"].items():
        r0, r1 = res["ranks"]
        assert r0["batches"] == r1["batches"], kind
        assert not set(r0["nums"]) & set(r1["nums"]), kind
        assert sorted(r0["nums"] + r1["nums"]) == expected, kind
        assert sorted(res["gathered"]) == expected, kind  # accelerator.gather of valid nums


# ---------------------------------------------------------------------------------------------
# Options and bad input

def test_member_auto_and_geometry(shards):
    assert make_loader("turbo", shards, "valid", 8).member == "rgb"          # matching .rgb present
    assert make_loader("turbo", shards, "valid", 8, size=32).member == "jpg"  # .rgb is 64 px
    with pytest.raises(DataError, match="rgb"):
        make_loader("turbo", shards, "valid", 8, size=32, member="rgb")
    b = next(iter(make_loader("cache", shards, "valid", 8, size=32)))
    assert b["image"].shape == (8, 3, 32, 32)


@pytest.fixture
def shard_copy(shards, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(shards, dst)
    return dst


def first_member(root: Path, tar_name: str, ext: str) -> tuple[int, int]:
    line = (root / tar_name.replace(".tar", ".idx")).read_text().splitlines()[1].split()
    i = line.index(ext)
    return int(line[i + 1]), int(line[i + 2])


@pytest.mark.parametrize("kind", KINDS)
def test_missing_and_truncated_shards(shard_copy, kind):
    tar = shard_copy / "train-00001.tar"
    with open(tar, "r+b") as f:
        f.truncate(tar.stat().st_size - 1024)
    with pytest.raises(DataError, match="train-00001.tar"):
        make_loader(kind, shard_copy, "train", 8)
    tar.unlink()
    with pytest.raises(DataError, match="train-00001.tar.*missing"):
        make_loader(kind, shard_copy, "train", 8)


def test_checksum_mismatch_with_verify(shard_copy):
    tar = shard_copy / "valid-00000.tar"
    off, _ = first_member(shard_copy, tar.name, "attr")
    data = bytearray(tar.read_bytes())
    data[off] ^= 0x02  # same size, different bytes (-1 <-> +1 of one attribute)
    tar.write_bytes(bytes(data))
    make_loader("turbo", shard_copy, "valid", 8)  # sizes only: not noticed (documented)
    with pytest.raises(DataError, match="valid-00000.tar.*sha256"):
        make_loader("turbo", shard_copy, "valid", 8, verify=True)


@pytest.mark.parametrize("kind", ["dali", "wds", "turbo", "cache"])
def test_corrupt_jpeg_is_a_data_error(shard_copy, kind):
    tar = shard_copy / "valid-00000.tar"
    off, _ = first_member(shard_copy, tar.name, "jpg")
    data = bytearray(tar.read_bytes())
    data[off:off + 16] = b"\x00" * 16  # no JPEG SOI marker any more; size unchanged
    tar.write_bytes(bytes(data))
    with pytest.raises(DataError, match="valid"):
        for _ in make_loader(kind, shard_copy, "valid", 8, member="jpg", num_workers=1):
            pass


@pytest.mark.parametrize("kind", ["dali", "wds", "turbo", "cache"])
def test_corrupt_entropy_data_is_a_data_error(shard_copy, kind):
    """Header intact, entropy data garbage: PIL and nvJPEG decode it to grey or noise without a
    word; every loader must refuse it, naming the shard and the sample."""
    tar = shard_copy / "valid-00000.tar"
    off, size = first_member(shard_copy, tar.name, "jpg")
    data = bytearray(tar.read_bytes())
    jpeg = data[off:off + size]
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big")
    garbage = bytes((37 * k + 11) % 255 for k in range(size - start - 2))  # never 0xFF: no markers
    data[off + start:off + size - 2] = garbage
    tar.write_bytes(bytes(data))
    key = split_keys(shard_copy, "valid")[0].split(".")[0]
    with pytest.raises(DataError, match=rf"valid-00000.tar.*{key}.*(Corrupt JPEG|does not decode)"):
        for _ in make_loader(kind, shard_copy, "valid", 8, member="jpg", num_workers=1):
            pass


def test_unreadable_image_in_the_folder(shards, celeba_copy):
    folder = celeba_copy / "img_align_celeba"
    victim = folder / sorted(split_keys(shards, "valid"))[3]
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=victim.name) as err:
        for _ in make_loader("pil", shards, "valid", 8, folder=folder, num_workers=2):
            pass
    assert "\n" not in str(err.value)  # one line, not the worker's traceback


def test_threads_leave_torch_settings_alone(shards):
    """turbo/cache run torch's resize serially in their own threads, not by a global switch."""
    import threading

    before = torch.get_num_threads()
    for kind in ("turbo", "cache"):
        list(make_loader(kind, shards, "valid", 8, member="jpg", num_workers=2))
    assert torch.get_num_threads() == before
    seen = []
    t = threading.Thread(target=lambda: (torch.ones(1 << 16).sum(), seen.append(torch.get_num_threads())))
    t.start()
    t.join()
    assert seen == [before]  # a new thread still gets the process's setting


def test_bad_requests(shards):
    with pytest.raises(DataError, match="no split 'nope'"):
        make_loader("turbo", shards, "nope", 8)
    with pytest.raises(DataError, match="fewer than world_size"):
        make_loader("cache", shards, "valid", 8, rank=0, world_size=25)
    with pytest.raises(DataError, match="no full batch"):
        make_loader("wds", shards, "valid", 30, drop_last=True)
    with pytest.raises(ValueError, match="kind"):
        make_loader("tfrecord", shards, "valid", 8)
    with pytest.raises(ValueError, match="rank"):
        make_loader("turbo", shards, "valid", 8, rank=2, world_size=2)
    with pytest.raises(DataError, match="manifest.json"):
        make_loader("turbo", shards / "nowhere", "valid", 8)


def test_pil_folder_override_and_missing_folder(shards, celeba_root, tmp_path):
    manifest = load_manifest(shards)
    loader = make_loader("pil", shards, "valid", 8, folder=manifest["image_dir"], num_workers=0)
    assert len(loader) == 3
    with pytest.raises(DataError, match="folder"):
        make_loader("pil", shards, "valid", 8, folder=tmp_path / "none")
    partial = tmp_path / "partial"
    partial.mkdir()
    with pytest.raises(DataError, match="missing"):
        make_loader("pil", shards, "valid", 8, folder=partial)


def test_pil_finds_the_folder_beside_moved_shards(celeba_root, tmp_path):
    """Another node (or a moved copy) keeps the shards and the image folder side by side at another
    absolute path: pil finds the folder relative to the shards."""
    from fastceleba.shardwriter import ShardOptions, write_shards

    old = tmp_path / "old"
    shutil.copytree(celeba_root, old / "celeba")
    write_shards(old / "celeba", old / "shards", ShardOptions(shard_size=100), progress=False)
    new = tmp_path / "elsewhere" / "data"
    shutil.move(old, new)
    loader = make_loader("pil", new / "shards", "valid", 8, num_workers=0)
    assert loader.folder == new / "shards" / ".." / "celeba" / "img_align_celeba"
    assert len(epoch(loader)) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_refused(shards):
    with pytest.raises(ValueError, match="CUDA"):
        make_loader("dali", shards, "valid", 8, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind,member", ALL)
def test_batches_arrive_on_the_gpu(shards, reference, kind, member):
    """Every GPU route (dali's nvJPEG "mixed" decode of the jpg member included): the batches of a
    whole flipped, shuffled epoch arrive on the device and hold the CPU route's images."""
    kw = dict(member=member, shuffle=True, flip=True, seed=3, num_workers=1)
    gpu = epoch(make_loader(kind, shards, "valid", 8, device="cuda", **kw))
    cpu = epoch(make_loader(kind, shards, "valid", 8, **kw))
    assert all(v.device.type == "cuda" for b in gpu for v in b.values())
    for a, b in zip(gpu, cpu, strict=True):
        assert torch.equal(a["num"].cpu(), b["num"]) and torch.equal(a["valid"].cpu(), b["valid"])
        mad = (a["image"].cpu() - b["image"]).abs().flatten(1).mean(1) * 255
        assert a["image"].is_contiguous() and mad.max() < RESAMPLED_BOUND
    unflipped = images_by_num(make_loader(kind, shards, "valid", 8, device="cuda", member=member))
    mad = {n: float((unflipped[n].cpu() - reference[n]).abs().mean()) * 255 for n in reference}
    print(f"{kind}:{member} on the GPU against pil: worst {max(mad.values()):.3f}/255")
    assert max(mad.values()) < RESAMPLED_BOUND


def test_heavy_imports_wait_for_the_loaders_that_need_them():
    """train.py with the cache loader never imports torchvision, DALI or webdataset (~1.5 s of start-up
    each run); the pil loader imports torchvision in the parent process, so the DataLoader workers
    forked every epoch inherit it instead of each importing it again (that halved pil's images/s); the
    wds loader and the shard writer resize without it (transforms.resize_crop_array)."""
    def run(code: str) -> None:
        proc = subprocess.run([sys.executable, "-c", "import sys\n" + code], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]

    run("import fastceleba.train\n"
        "heavy = [m for m in ('torchvision', 'nvidia.dali', 'webdataset') if m in sys.modules]\n"
        "assert not heavy, heavy")
    run("import fastceleba.loaders.pil\nassert 'torchvision.transforms.functional' in sys.modules")
    run("import fastceleba.loaders.wds, fastceleba.shardwriter\nassert 'torchvision' not in sys.modules")
