"""Issue 10, shard side: every bad input gives one clear line (or the right data), nothing is lost.

One test per item, on copies of the synthetic CelebA of conftest.py; each failed before its fix.
"""

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import NUM_IMAGES, ROOT
from fastceleba import shards as shards_mod
from fastceleba import shardwriter
from fastceleba.celeba import (ATTR_FILE, ATTR_NAMES, IDENTITY_FILE, LANDMARK_NAMES, LANDMARKS_FILE,
                               PARTITION_FILE, load_celeba, parse_identity, parse_partition)
from fastceleba.errors import DataError
from fastceleba.shards import (MANIFEST, PARTIAL_DIR, RAW_MEMBER, check_checksums, load_manifest, raw_member,
                               shard_paths, verify)
from fastceleba.shardwriter import ShardOptions, write_shards
from test_shards import files_of, one_error_line, run_cli

QUIET = dict(progress=False, log=lambda line: None)


def tar_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of every shard in out."""
    samples = {}
    for tar in sorted(out.glob("*.tar")):
        samples.update(shards_mod._samples(tar.read_bytes()))
    return samples


# --- 1: duplicate rows ------------------------------------------------------------------------

@pytest.mark.parametrize("filename,parse", [(PARTITION_FILE, parse_partition), (IDENTITY_FILE, parse_identity)])
def test_conflicting_duplicate_rows_name_file_and_both_lines(celeba_copy, tmp_path, capsys, filename, parse):
    path = celeba_copy / filename
    lines = path.read_text().splitlines(keepends=True)
    name, value = lines[122].split()
    assert name == "000123.jpg"
    lines.append(f"{name} {int(value) % 2 + 1}\n")  # a second, different row at the end
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=rf"{filename}: 000123.jpg is listed twice .* lines 123 and {len(lines)}"):
        parse(path)
    code, text = run_cli(capsys, celeba_copy, tmp_path / "out")
    assert code == 2 and one_error_line(text) and filename in text and "123 and" in text


def test_exact_duplicate_row_is_a_warning(celeba_copy, tmp_path, capsys):
    path = celeba_copy / PARTITION_FILE
    path.write_text(path.read_text() + path.read_text().splitlines(keepends=True)[4])
    code, text = run_cli(capsys, celeba_copy, tmp_path / "out", "--shard-size", 100)
    assert code == 0, text
    assert "warning:" in text and "000005.jpg is listed twice (lines 5 and 241" in text


# --- 2: num is the file number -----------------------------------------------------------------

def test_num_is_the_file_number_when_numbering_has_gaps(celeba_copy, tmp_path):
    images = celeba_copy / "img_align_celeba"
    for name in ("000002.jpg", "000003.jpg", "000100.jpg"):
        (images / name).unlink()
    for name in (PARTITION_FILE, ATTR_FILE, IDENTITY_FILE, LANDMARKS_FILE):
        (celeba_copy / name).unlink()
    write_shards(celeba_copy, tmp_path / "out", ShardOptions(shard_size=100), **QUIET)
    samples = tar_samples(tmp_path / "out")
    assert len(samples) == NUM_IMAGES - 3 and "000004" in samples
    for key, sample in samples.items():
        assert int(np.frombuffer(sample["num"], "<i4")[0]) == int(key)  # 000004 -> 4, not 2
        assert json.loads(sample["json"])["num"] == int(key)


@pytest.mark.parametrize("bad", ["face_01.jpg", "000001 (copy).jpg"])
def test_image_name_that_is_not_a_number(celeba_copy, tmp_path, capsys, bad):
    shutil.copy(celeba_copy / "img_align_celeba" / "000001.jpg", celeba_copy / "img_align_celeba" / bad)
    code, text = run_cli(capsys, celeba_copy, tmp_path / "out")
    assert code == 2 and one_error_line(text) and bad in text and "NNNNNN.jpg" in text


# --- 6: the DALI index is checked ---------------------------------------------------------------

def test_verify_checks_the_dali_index(shards, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    manifest = load_manifest(copy)
    for split in manifest["splits"]:
        check_checksums(copy, split)
        for shard in manifest["splits"][split]["shards"]:
            assert shard["index_sha256"] == shards_mod.file_sha256(copy / shard["index"])
    tar, idx = shard_paths(copy, "train")[0]
    lines = idx.read_text().splitlines(keepends=True)
    lines[2] = lines[1]  # the first sample twice, the second never: same count, same size
    idx.write_text("".join(lines))
    with pytest.raises(DataError, match=rf"{idx.name}: sha256 does not match the manifest"):
        check_checksums(copy, "train")
    code, text = run_cli(capsys, "--verify", copy)
    assert code == 1 and idx.name in text


# --- 7: resume state fingerprints the inputs ------------------------------------------------------

def test_resume_starts_over_when_annotations_changed(celeba_copy, tmp_path, capsys):
    opts = ShardOptions(shard_size=40)
    victim = celeba_copy / "img_align_celeba" / "000240.jpg"  # in test, the last split written
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    code, _ = run_cli(capsys, celeba_copy, out, "--shard-size", 40, "--workers", 1)
    assert code == 2 and (out / "train-00000.tar").is_file()  # an unfinished run with finished shards

    victim.write_bytes(good)
    attr = celeba_copy / ATTR_FILE
    lines = attr.read_text().splitlines(keepends=True)
    fields = lines[2].split()  # 000001.jpg, in train: flip its first attribute
    lines[2] = " ".join([fields[0], str(-int(fields[1]))] + fields[2:]) + "\n"
    attr.write_text("".join(lines))
    code, text = run_cli(capsys, celeba_copy, out, "--shard-size", 40, "--workers", 1)
    assert code == 0, text
    assert [line for line in text.splitlines() if "starting over" in line and ATTR_FILE in line]
    write_shards(celeba_copy, tmp_path / "clean", opts, **QUIET)
    assert files_of(out) == files_of(tmp_path / "clean")
    assert tar_samples(out)["000001"]["attr"][0] == np.int8(-int(fields[1])).tobytes()[0]


def test_resume_starts_over_when_options_changed(celeba_copy, tmp_path, capsys):
    (celeba_copy / "img_align_celeba" / "000240.jpg").write_bytes(b"\xff\xd8 garbage")
    out = tmp_path / "out"
    assert run_cli(capsys, celeba_copy, out, "--shard-size", 40, "--workers", 1)[0] == 2
    code, text = run_cli(capsys, celeba_copy, out, "--shard-size", 30, "--workers", 1, "--skip-bad")
    assert code == 0 and "starting over" in text and "options" in text
    assert sorted(p.name for p in out.glob("train-*.tar")) == [f"train-{i:05d}.tar" for i in range(7)]
    assert verify(out, progress=False) == []


# --- 8: Kaggle layout, image folder as SRC, annotations said loudly --------------------------------

def to_kaggle(root: Path) -> None:
    """Rewrite an official-layout CelebA as Kaggle ships it."""
    images = root / "img_align_celeba"
    images.rename(root / "tmp")
    images.mkdir()
    (root / "tmp").rename(images / "img_align_celeba")
    part = [line.split() for line in (root / PARTITION_FILE).read_text().splitlines()]
    (root / "list_eval_partition.csv").write_text(
        "image_id,partition\r\n" + "".join(f"{a},{b}\r\n" for a, b in part))
    for txt, csv, names in ((ATTR_FILE, "list_attr_celeba.csv", ATTR_NAMES),
                            (LANDMARKS_FILE, "list_landmarks_align_celeba.csv", LANDMARK_NAMES)):
        rows = [line.split() for line in (root / txt).read_text().splitlines()[2:]]
        (root / csv).write_text(",".join(["image_id"] + names) + "\n" + "".join(",".join(r) + "\n" for r in rows))
    (root / "list_bbox_celeba.csv").write_text("image_id,x_1,y_1,width,height\n"
                                               + "".join(f"{r[0]},95,71,226,313\n" for r in part))
    for name in (PARTITION_FILE, ATTR_FILE, LANDMARKS_FILE, IDENTITY_FILE):
        (root / name).unlink()


def test_kaggle_layout(celeba_copy, tmp_path, capsys):
    official = load_celeba(celeba_copy)
    to_kaggle(celeba_copy)
    ds = load_celeba(celeba_copy)
    assert ds.partition == official.partition and ds.identity is None
    assert all(np.array_equal(ds.attrs[n], official.attrs[n]) for n in ds.images)
    assert all(np.array_equal(ds.landmarks[n], official.landmarks[n]) for n in ds.images)
    code, text = run_cli(capsys, celeba_copy, tmp_path / "out", "--shard-size", 100)
    assert code == 0, text
    for csv in ("list_eval_partition.csv", "list_attr_celeba.csv", "list_landmarks_align_celeba.csv"):
        assert [line for line in text.splitlines() if "using" in line and csv in line]
    assert [line for line in text.splitlines() if line.startswith("identity: none")]
    assert [line for line in text.splitlines() if "warning:" in line and "list_bbox_celeba.csv" in line]
    manifest = load_manifest(tmp_path / "out")
    assert set(manifest["members"]) == {"jpg", "num", "attr", "lmk", "json"}
    assert manifest["annotations"]["attrs"].endswith("list_attr_celeba.csv")


@pytest.mark.parametrize("kaggle", [False, True])
def test_bulk_and_row_parsers_give_the_same_tables(celeba_copy, kaggle):
    """A regular file is parsed in bulk (a full-size CelebA loads in seconds); the row-by-row parser,
    which names the line of any problem, must give the very same table, values and types."""
    from fastceleba import celeba

    if kaggle:
        to_kaggle(celeba_copy)
    ds = load_celeba(celeba_copy)
    for attr, (names, parse) in celeba.ANNOTATIONS.items():
        path = ds.sources[attr]
        if path is None:
            continue
        lines = path.read_text().splitlines()
        csv = path.suffix == ".csv"
        columns = {"attrs": ATTR_NAMES, "landmarks": LANDMARK_NAMES}.get(attr, ["partition"] if csv else None)
        skip, _ = celeba._header(path, lines, columns, csv)
        width = len(lines[skip].replace(",", " ").split())
        convert = {"partition": celeba._split_value, "attrs": celeba._pm_one, "identity": lambda v: int(v[0]),
                   "landmarks": celeba._int_array(np.int16)}[attr]
        rows = celeba._table(path, celeba._rows(path, lines[skip:], skip, width, csv), convert, None)
        bulk = getattr(ds, attr)
        assert list(bulk) == list(rows) and len(bulk) == NUM_IMAGES
        for name in rows:
            a, b = bulk[name], rows[name]
            assert type(a) is type(b) and np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype
    lines = (celeba_copy / ("list_attr_celeba.csv" if kaggle else ATTR_FILE)).read_text().splitlines()
    assert celeba._bulk_table(lines[1 if kaggle else 2:][:5] + ["000006.jpg 1"], 41, kaggle, None) is None


@pytest.mark.parametrize("kaggle", [False, True])
def test_image_folder_itself_as_src(celeba_copy, tmp_path, capsys, kaggle):
    if kaggle:
        to_kaggle(celeba_copy)
    images = celeba_copy / "img_align_celeba" / ("img_align_celeba" if kaggle else "")
    code, text = run_cli(capsys, images, tmp_path / "out", "--shard-size", 100)
    assert code == 0, text
    manifest = load_manifest(tmp_path / "out")
    assert manifest["annotations"]["partition"] is not None and "attr" in manifest["members"]
    assert [line for line in text.splitlines() if line.startswith("partition: using")]


def test_no_annotations_is_said(celeba_copy, tmp_path, capsys):
    for name in (PARTITION_FILE, ATTR_FILE, LANDMARKS_FILE, IDENTITY_FILE):
        (celeba_copy / name).unlink()
    code, text = run_cli(capsys, celeba_copy, tmp_path / "out", "--shard-size", 100)
    assert code == 0 and "partition: none" in text and "random split" in text


# --- 9: OSErrors are one line ------------------------------------------------------------------

def test_out_is_an_existing_file(celeba_root, tmp_path, capsys):
    out = tmp_path / "shards"
    out.write_text("not a directory")
    code, text = run_cli(capsys, celeba_root, out)
    assert code == 2 and one_error_line(text) and str(out) in text and "directory" in text


@pytest.mark.parametrize("err,words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "not writable"),
                                       (errno.EACCES, "not writable")])
def test_write_errors_are_one_line(celeba_root, tmp_path, capsys, monkeypatch, err, words):
    def fail(path, data, sync=True):
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(shardwriter, "atomic_write", fail)
    code, text = run_cli(capsys, celeba_root, tmp_path / "out", "--workers", 1)
    assert code == 2 and one_error_line(text) and words in text and str(tmp_path / "out") in text


# --- 11: DecompressionBombError and resize failures are bad images ---------------------------------

def test_bomb_and_resize_failures_are_skipped_and_counted(celeba_copy, tmp_path, capsys, monkeypatch):
    images = celeba_copy / "img_align_celeba"
    Image.new("RGB", (400, 400), "gray").save(images / "000010.jpg")  # the "bomb"
    Image.new("RGB", (200, 200), "gray").save(images / "000020.jpg")  # the resize fails
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 178x218 passes, 400x400 is a bomb
    resize = shardwriter.resize_crop_array

    def fragile(img, size, crop):
        if img.size == (200, 200):
            raise OSError("broken data stream when reading image file")
        return resize(img, size, crop)

    monkeypatch.setattr(shardwriter, "resize_crop_array", fragile)
    code, text = run_cli(capsys, celeba_copy, tmp_path / "stop", "--size", 32, "--workers", 1)
    assert code == 2 and one_error_line(text) and "000010.jpg" in text and "--skip-bad" in text
    code, text = run_cli(capsys, celeba_copy, tmp_path / "skip", "--size", 32, "--workers", 1, "--skip-bad")
    assert code == 0, text
    assert "skipped 000010.jpg" in text and "skipped 000020.jpg" in text
    manifest = load_manifest(tmp_path / "skip")
    assert [s["file"] for s in manifest["skipped"]] == ["000010.jpg", "000020.jpg"]
    assert sum(s["num_samples"] for s in manifest["splits"].values()) == NUM_IMAGES - 2


# --- 12: OUT inside SRC --------------------------------------------------------------------------

@pytest.mark.parametrize("where", [".", "shards", "img_align_celeba/shards"])
def test_out_inside_src_is_refused(celeba_copy, capsys, where):
    out = celeba_copy / where
    code, text = run_cli(capsys, celeba_copy, out)
    assert code == 2 and one_error_line(text) and "inside" in text
    assert not list(celeba_copy.rglob("*.tar"))


# --- 13: the advice after a deleted manifest works -------------------------------------------------

def test_deleted_manifest_advice_gives_a_working_command(celeba_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, celeba_root, out, "--shard-size", 100)[0] == 0
    before = files_of(out)
    (out / MANIFEST).unlink()
    with pytest.raises(DataError) as info:
        load_manifest(out)
    advice = str(info.value).split("`")[1].split()
    assert advice[:2] == ["python", "tools/shard.py"]
    args = [str(celeba_root) if a == "CELEBA_DIR" else a for a in advice[2:]]
    code, text = run_cli(capsys, *args, "--shard-size", 100)
    assert code == 0, text
    assert files_of(out) == before and verify(out, progress=False) == []


# --- 15: kill -9 leaves no workers and the next run cleans up ------------------------------------

SLOW_RUN = """
import sys, time
sys.path.insert(0, {root!r})
import fastceleba.shardwriter as sh
decode = sh._decode
sh._decode = lambda *a, **kw: (time.sleep(0.05), decode(*a, **kw))[1]
sh.write_shards({src!r}, {out!r}, sh.ShardOptions(shard_size=20), workers=2, progress=False)
"""


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_kill_9_leaves_no_workers_and_next_run_cleans_temp_files(celeba_root, tmp_path):
    out = tmp_path / "out"
    script = SLOW_RUN.format(root=str(ROOT), src=str(celeba_root), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while len(workers := children(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(workers) >= 2 and proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [w for w in workers if alive(w)]
    for w in orphans:
        os.kill(w, signal.SIGKILL)
    assert not orphans, "pool workers outlived the killed parent"

    # What a killed run may leave: temp files beside the shards and in the resume state.
    (out / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (out / ".train-00003.tar.k2j4h5g6.tmp", out / PARTIAL_DIR / ".train-00003.tar.json.a1b2c3d4.tmp"):
        stale.write_bytes(b"half")
    write_shards(celeba_root, out, ShardOptions(shard_size=20), workers=1, **QUIET)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert verify(out, progress=False) == []


# --- 16: plain webdataset reads our shards --------------------------------------------------------

@pytest.mark.parametrize("spec", ["rgb", "pil", "torchrgb"])
def test_canonical_webdataset_decode_reads_every_member(shards, celeba_root, spec):
    ds = load_celeba(celeba_root)
    urls = [str(t) for split in ("train", "valid", "test") for t, _ in shard_paths(shards, split)]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode(spec):
        name = sample["__key__"] + ".jpg"
        with Image.open(io.BytesIO((ds.image_dir / name).read_bytes())) as img:
            want = np.asarray(img.convert("RGB"))
        image = sample["jpg"]
        if spec == "rgb":
            got = np.round(image * 255).astype(np.uint8)
        elif spec == "pil":
            got = np.asarray(image)
        else:
            got = np.round(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert np.array_equal(got, want), name
        raw = np.frombuffer(sample[RAW_MEMBER], np.uint8).reshape(64, 64, 3)
        assert raw.std() > 0  # a real picture, left as bytes by the decoders
        assert int(np.frombuffer(sample["num"], "<i4")[0]) == ds.number[name]
        assert np.array_equal(np.frombuffer(sample["attr"], np.int8), ds.attrs[name])
        assert int(np.frombuffer(sample["ident"], "<i4")[0]) == ds.identity[name]
        assert np.array_equal(np.frombuffer(sample["lmk"], "<i2"), ds.landmarks[name])
        info = sample["json"]
        assert info["num"] == ds.number[name] and info["identity"] == ds.identity[name]
        assert [info["attrs"][a] for a in ATTR_NAMES] == ds.attrs[name].tolist()
        seen += 1
    assert seen == NUM_IMAGES


def test_raw_member_of_old_shards_is_still_found(shards, tmp_path):
    copy = tmp_path / "v1"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    assert manifest["format_version"] == 3 and raw_member(manifest) == RAW_MEMBER
    manifest["format_version"] = 1
    manifest["members"] = {("rgb" if k == RAW_MEMBER else k): v for k, v in manifest["members"].items()}
    del manifest["raw_member"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert raw_member(load_manifest(copy)) == "rgb"
