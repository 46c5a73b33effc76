"""tools/shard.py and fastceleba.shards: formats, splits, reproducibility, resume, bad input, readers."""

import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from conftest import NUM_IMAGES, ROOT
from fastceleba.celeba import (ATTR_NAMES, LANDMARK_NAMES, PARTITION_FILE, load_celeba,
                               parse_attributes)
from fastceleba.errors import DataError
from fastceleba.shards import MANIFEST, PARTIAL_DIR, RAW_MEMBER, load_manifest, shard_paths, split_keys, verify
from fastceleba.shardwriter import ShardOptions, assign_splits, cut_shards, write_shards

spec = importlib.util.spec_from_file_location("shard_cli", ROOT / "tools" / "shard.py")
shard_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shard_cli)


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def run_cli(capsys, *args) -> tuple[int, str]:
    code = shard_cli.main([str(a) for a in args] + ["--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def one_error_line(text: str) -> bool:
    """Exactly one `error:` line, and it is the last one (before it: what the tool found)."""
    lines = text.strip().splitlines()
    return [line for line in lines if line.startswith("error:")] == lines[-1:]


# --- the official formats ---------------------------------------------------------------------

def test_generated_celeba_parses_in_official_formats(celeba_root):
    ds = load_celeba(celeba_root)
    assert ds.images[0] == "000001.jpg" and len(ds.images) == NUM_IMAGES
    assert [ds.number[n] for n in ds.images[:3]] == [1, 2, 3]
    assert sorted(set(ds.partition.values())) == [0, 1, 2]
    # contiguous official-style blocks: train first, then valid, then test
    assert [ds.partition[n] for n in ds.images] == sorted(ds.partition[n] for n in ds.images)
    attrs = np.stack([ds.attrs[n] for n in ds.images])
    assert attrs.shape == (NUM_IMAGES, 40) and set(np.unique(attrs)) == {-1, 1}
    assert 0 < (attrs[:, ATTR_NAMES.index("Smiling")] == 1).mean() < 1  # both kinds present
    lmk = np.stack([ds.landmarks[n] for n in ds.images])
    assert lmk.shape == (NUM_IMAGES, 10)
    assert (lmk[:, 0::2] >= 0).all() and (lmk[:, 0::2] < 178).all() and (lmk[:, 1::2] < 218).all()
    assert len(set(ds.identity.values())) > 1


def test_attribute_file_layout(celeba_root):
    lines = (celeba_root / "list_attr_celeba.txt").read_text().splitlines()
    assert lines[0].strip() == str(NUM_IMAGES)
    assert lines[1].split() == ATTR_NAMES
    first = lines[2]
    assert first.startswith("000001.jpg ") and len(first.split()) == 41
    marks = (celeba_root / "list_landmarks_align_celeba.txt").read_text().splitlines()
    assert marks[1].split() == LANDMARK_NAMES and len(marks) == NUM_IMAGES + 2


# --- splits, counts, shards -----------------------------------------------------------------

def test_every_split_and_count(shards, celeba_root):
    ds = load_celeba(celeba_root)
    manifest = load_manifest(shards)
    seen = []
    for i, split in enumerate(("train", "valid", "test")):
        keys = split_keys(shards, split)
        expected = [n for n in ds.images if ds.partition[n] == i]
        assert sorted(keys) == expected  # exactly the official partition ...
        assert keys != expected  # ... shuffled before cutting into shards
        entry = manifest["splits"][split]
        assert entry["num_samples"] == len(keys) == sum(s["num_samples"] for s in entry["shards"])
        assert all(s["num_samples"] <= 50 for s in entry["shards"])
        assert len(shard_paths(shards, split)) == len(entry["shards"])
        seen += keys
    assert sorted(seen) == ds.images
    assert manifest["raw_member"] == RAW_MEMBER
    assert manifest["members"][RAW_MEMBER] == {"dtype": "uint8", "shape": [64, 64, 3]}
    assert manifest["members"]["attr"] == {"dtype": "int8", "shape": [40]}
    assert manifest["skipped"] == [] and manifest["attr_names"] == ATTR_NAMES
    assert verify(shards, progress=False) == []


def test_index_matches_dalis_own_tool(shards, tmp_path):
    from wds2idx import IndexCreator

    tar, idx = shard_paths(shards, "train")[0]
    with IndexCreator(str(tar), str(tmp_path / "ref.idx"), verbose=False) as creator:
        creator.create_index()
    assert (tmp_path / "ref.idx").read_text() == idx.read_text()


@pytest.mark.parametrize("name", ["000001.jpg", "000001.rgb8", "x" * 100, "x" * 101, "é.json"])
@pytest.mark.parametrize("size", [0, 1, 512, 12345, 8 ** 11 - 1, 8 ** 11])
def test_tar_headers_are_tarfiles_own(name, size):
    import tarfile

    from fastceleba.shardwriter import ustar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    try:
        expected = info.tobuf(tarfile.USTAR_FORMAT)
    except ValueError:  # too long a name or too large a file for USTAR: the same error
        with pytest.raises(ValueError):
            ustar_header(name, size)
        return
    assert ustar_header(name, size) == expected


def test_random_split_without_partition_file(celeba_copy, tmp_path):
    (celeba_copy / PARTITION_FILE).unlink()
    opts = ShardOptions(split=(0.5, 0.25, 0.25), seed=3)
    a = write_shards(celeba_copy, tmp_path / "a", opts, progress=False)
    assert [a["splits"][s]["num_samples"] for s in ("train", "valid", "test")] == [120, 60, 60]
    b = assign_splits(load_celeba(celeba_copy), ShardOptions(split=(0.5, 0.25, 0.25), seed=4))
    assert sorted(b["test"]) != sorted(split_keys(tmp_path / "a", "test"))  # the seed matters


def test_reruns_are_byte_identical(celeba_root, tmp_path):
    opts = ShardOptions(size=64, shard_size=70)
    write_shards(celeba_root, tmp_path / "one", opts, workers=1, progress=False)
    write_shards(celeba_root, tmp_path / "two", opts, workers=2, progress=False)
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert one == two and any(name.endswith(".tar") for name in one)
    write_shards(celeba_root, tmp_path / "one", opts, workers=2, progress=False)  # same command again
    assert files_of(tmp_path / "one") == one


def test_interrupted_run_resumes_keeping_finished_shards(celeba_copy, tmp_path, capsys):
    opts = ShardOptions(shard_size=40)
    groups = assign_splits(load_celeba(celeba_copy), opts)
    victim = cut_shards(groups["test"], celeba_copy / "img_align_celeba", opts)[-1][0]
    good = (celeba_copy / "img_align_celeba" / victim).read_bytes()
    (celeba_copy / "img_align_celeba" / victim).write_bytes(good[: len(good) // 2])

    out = tmp_path / "out"
    code, text = run_cli(capsys, celeba_copy, out, "--shard-size", 40, "--workers", 1)
    assert code == 2 and victim in text and "--skip-bad" in text and one_error_line(text)
    assert not (out / MANIFEST).exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert "train-00000.tar" in finished and "test-00000.tar" not in finished

    with pytest.raises(DataError, match="unfinished run"):
        load_manifest(out)
    (celeba_copy / "img_align_celeba" / victim).write_bytes(good)
    code, text = run_cli(capsys, celeba_copy, out, "--shard-size", 40, "--workers", 1)
    assert code == 0, text
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # kept, not rewritten
    assert not (out / PARTIAL_DIR).exists()
    write_shards(celeba_copy, tmp_path / "clean", opts, progress=False)
    assert files_of(out) == files_of(tmp_path / "clean")


# --- bad input ------------------------------------------------------------------------------

def test_corrupt_image_is_named_and_skip_bad_lists_it(celeba_copy, tmp_path, capsys):
    bad = celeba_copy / "img_align_celeba" / "000007.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    code, text = run_cli(capsys, celeba_copy, tmp_path / "out")
    assert code == 2 and "000007.jpg" in text and one_error_line(text)
    assert not (tmp_path / "out" / MANIFEST).exists()

    code, text = run_cli(capsys, celeba_copy, tmp_path / "skip", "--skip-bad")
    assert code == 0 and "skipped 000007.jpg" in text
    manifest = load_manifest(tmp_path / "skip")
    assert [s["file"] for s in manifest["skipped"]] == ["000007.jpg"]
    assert sum(s["num_samples"] for s in manifest["splits"].values()) == NUM_IMAGES - 1
    assert verify(tmp_path / "skip", progress=False) == []


def test_partition_row_without_image(celeba_copy, tmp_path, capsys):
    (celeba_copy / "img_align_celeba" / "000011.jpg").unlink()
    code, text = run_cli(capsys, celeba_copy, tmp_path / "out")
    assert code == 2 and PARTITION_FILE in text and "000011.jpg" in text


@pytest.mark.parametrize("damage", ["drop_row", "bad_value", "short_row"])
def test_malformed_annotation_file(celeba_copy, tmp_path, capsys, damage):
    path = celeba_copy / "list_attr_celeba.txt"
    lines = path.read_text().splitlines(keepends=True)
    if damage == "drop_row":
        del lines[10]
    elif damage == "bad_value":
        lines[10] = lines[10].replace(" 1", " x", 1)
    else:
        lines[10] = " ".join(lines[10].split()[:-3]) + "\n"
    path.write_text("".join(lines))
    code, text = run_cli(capsys, celeba_copy, tmp_path / "out")
    assert code == 2 and "list_attr_celeba.txt" in text and one_error_line(text)
    with pytest.raises(DataError):
        parse_attributes(path)


def test_annotation_files_are_optional(celeba_copy, tmp_path):
    for name in ("list_attr_celeba.txt", "identity_CelebA.txt", "list_landmarks_align_celeba.txt"):
        (celeba_copy / name).unlink()
    manifest = write_shards(celeba_copy, tmp_path / "out", progress=False)
    assert set(manifest["members"]) == {"jpg", "num", "json"}
    assert verify(tmp_path / "out", progress=False) == []


def test_nested_zip_layout(celeba_copy, tmp_path):
    images = celeba_copy / "img_align_celeba"
    images.rename(celeba_copy / "tmp")
    images.mkdir()
    (celeba_copy / "tmp").rename(images / "img_align_celeba")
    manifest = write_shards(celeba_copy, tmp_path / "out", progress=False)
    assert manifest["image_dir"].endswith("img_align_celeba/img_align_celeba")


def test_output_directory_with_other_shards(celeba_root, shards, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data-000.tar").write_bytes(b"")
    code, text = run_cli(capsys, celeba_root, foreign)
    assert code == 2 and "foreign" in text
    code, text = run_cli(capsys, celeba_root, shards, "--shard-size", 7)  # other options
    assert code == 2 and "other options" in text and "rm -r" in text


def test_wrong_paths(tmp_path, capsys):
    code, text = run_cli(capsys, tmp_path / "nope", tmp_path / "out")
    assert code == 2 and "nope" in text
    code, text = run_cli(capsys, "--verify", tmp_path)
    assert code == 2 and "tools/shard.py" in text


def test_verify_reports_a_truncated_shard(shards, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    tar = copy / load_manifest(copy)["splits"]["valid"]["shards"][0]["tar"]
    tar.write_bytes(tar.read_bytes()[:-3000])
    code, text = run_cli(capsys, "--verify", copy)
    assert code == 1 and tar.name in text and "checksum" in text
    with pytest.raises(DataError, match="truncated"):
        shard_paths(copy, "valid")


# --- both readers get the same samples ------------------------------------------------------

def read_with_webdataset(urls: list[str]) -> dict[int, dict]:
    out = {}
    # No WebDataset decode stage: members stay bytes, so nothing in a shard is ever unpickled.
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        num = int(np.frombuffer(sample["num"], "<i4")[0])
        out[num] = {"jpg": sample["jpg"], "rgb": sample[RAW_MEMBER], "attr": np.frombuffer(sample["attr"], np.int8),
                    "ident": int(np.frombuffer(sample["ident"], "<i4")[0]), "info": json.loads(sample["json"])}
    return out


def read_with_dali(shards: Path, split: str) -> dict[int, dict]:
    from nvidia.dali import fn, pipeline_def, types

    pairs = shard_paths(shards, split)
    count = load_manifest(shards)["splits"][split]["num_samples"]

    @pipeline_def(batch_size=8, num_threads=2, device_id=None)
    def pipe():
        jpg, rgb, num, attr, ident = fn.readers.webdataset(
            paths=[str(t) for t, _ in pairs], index_paths=[str(i) for _, i in pairs],
            ext=["jpg", RAW_MEMBER, "num", "attr", "ident"],
            dtypes=[types.UINT8, types.UINT8, types.INT32, types.INT8, types.INT32],
            missing_component_behavior="error", name="Reader")
        return jpg, fn.decoders.image(jpg, device="cpu", output_type=types.RGB), rgb, num, attr, ident

    p = pipe()
    p.build()
    out = {}
    while len(out) < count:
        for jpg, image, rgb, num, attr, ident in zip(*(o.as_array() if o.is_dense_tensor() else
                                                     [np.array(t) for t in o] for o in p.run())):
            out[int(num[0])] = {"jpg": bytes(np.array(jpg)), "image": np.array(image),
                                "rgb": bytes(np.array(rgb)), "attr": np.array(attr), "ident": int(ident[0])}
    return out


def test_dali_and_webdataset_read_the_same_samples(shards):
    from PIL import Image

    pairs = shard_paths(shards, "train")
    by_wds = read_with_webdataset([str(t) for t, _ in pairs])
    by_dali = read_with_dali(shards, "train")
    assert sorted(by_wds) == sorted(by_dali) and len(by_wds) == 192
    for num, ref in by_wds.items():
        got = by_dali[num]
        assert got["jpg"] == ref["jpg"] and got["rgb"] == ref["rgb"]
        assert np.array_equal(got["attr"], ref["attr"]) and got["ident"] == ref["ident"]
        assert ref["info"]["num"] == num and ref["info"]["identity"] == ref["ident"]
        pil = np.asarray(Image.open(io.BytesIO(ref["jpg"])).convert("RGB"), dtype=np.int16)
        assert got["image"].shape == (218, 178, 3)
        assert np.abs(got["image"].astype(np.int16) - pil).mean() < 1.0  # both libjpeg-turbo
