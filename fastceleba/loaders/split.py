"""One split of a shard directory, opened and checked before any loader reads it.

``open_split`` checks what is cheap to check (files exist, sizes and counts agree with the
manifest; sha256 only with ``verify=True``) and describes the split; ``choose_member`` resolves
which image member ("jpg" or the pre-resized "rgb") a loader reads. Nothing here decodes images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import remote
from ..errors import DataError
from ..remote import RemoteDir, location
from ..shards import MANIFEST, file_sha256, load_manifest, shard_paths, split_keys

LABELS = ("num", "attr", "ident")  # binary members that go into batches, when the shards carry them


@dataclass
class SplitData:
    """One split of a shard directory, checked: its shards, per-shard counts, keys and labels."""

    root: Path | RemoteDir            # a local directory, or a URL / pipe: that only wds streams
    manifest: dict
    split: str
    shards: list[tuple[Path, Path]]   # (tar, idx); URLs / pipe commands (str) when root is remote
    counts: list[int]                 # samples per shard
    keys: list[str]                   # image file names, in shard order
    labels: list[tuple[str, str]]     # (member, dtype) of LABELS the shards carry

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    @property
    def members(self) -> dict:
        return self.manifest["members"]


def open_split(data: str | os.PathLike, split: str, verify: bool = False) -> SplitData:
    """Check and describe a split. Cheap checks always (files exist, sizes match the manifest,
    counts agree); ``verify=True`` also compares each tar's sha256 with the manifest. ``data`` may
    be an http(s) URL or a ``pipe:`` command (fastceleba.remote): the manifest and keys are read
    from there; tars are neither fetched nor checked here, and ``verify=True`` is refused."""
    root = location(data)
    if isinstance(root, RemoteDir):  # a URL or pipe: only the wds loader streams it (remote.py)
        manifest = remote.load_manifest(root)
        shards = [(root / s["tar"], root / s["index"]) for s in remote.split_entry(root, split, manifest)["shards"]]
        keys = remote.split_keys(root, split, manifest)
        if verify:
            raise DataError(f"{root}: sha256 cannot be checked while streaming; stage the shards with "
                            f"`python tools/stage.py {root.quoted()} DIR` (it checks every sha256) and read DIR")
    else:
        manifest = load_manifest(root)
        shards = shard_paths(root, split, manifest)
        keys = split_keys(root, split, manifest)
    entry = manifest["splits"][split]
    counts = [int(s["num_samples"]) for s in entry["shards"]]
    if not (sum(counts) == len(keys) == int(entry["num_samples"])):
        raise DataError(f"{root / MANIFEST}: split {split!r} counts disagree (shards {sum(counts)}, "
                        f"keys {len(keys)}, manifest {entry['num_samples']}); re-run tools/shard.py")
    if not keys:
        raise DataError(f"{root / MANIFEST}: split {split!r} has no samples; choose another split "
                        "or re-shard with a split that gives it images")
    if verify:
        for shard, (tar, _) in zip(entry["shards"], shards):
            if file_sha256(tar) != shard["sha256"]:
                raise DataError(f"{tar}: sha256 does not match the manifest (corrupt or replaced); "
                                "delete it and re-run tools/shard.py with the same arguments")
    members = manifest["members"]
    labels = [(name, members[name]["dtype"]) for name in LABELS if name in members]
    if "num" not in members:
        raise DataError(f"{root / MANIFEST}: shards carry no .num member; re-make them with tools/shard.py")
    return SplitData(root, manifest, split, shards, counts, keys, labels)


def choose_member(sd: SplitData, member: str, size: int, crop: int | None) -> str:
    """Resolve ``member`` ("jpg", "rgb" or "auto") against what the shards hold."""
    members, manifest_path = sd.members, sd.root / MANIFEST
    rgb_ok = "rgb" in members and sd.manifest.get("size") == size and sd.manifest.get("crop") == crop
    if member == "auto":
        member = "rgb" if rgb_ok else "jpg"
    if member == "jpg" and "jpg" not in members:
        raise DataError(f"{manifest_path}: the shards hold no JPEGs (made with --no-jpeg) and their "
                        f".rgb members are {sd.manifest.get('size')} px, crop {sd.manifest.get('crop')}; "
                        f"ask for that geometry or re-shard with JPEGs")
    if member == "rgb" and not rgb_ok:
        have = (f"{sd.manifest.get('size')} px, crop {sd.manifest.get('crop')}" if "rgb" in members
                else "absent")
        raise DataError(f"{manifest_path}: .rgb members are {have} but size={size}, crop={crop} was "
                        f"asked; use member='jpg' or re-shard with --size {size}"
                        + (f" --crop {crop}" if crop else ""))
    if member not in ("jpg", "rgb"):
        raise ValueError(f"member must be 'jpg', 'rgb' or 'auto', not {member!r}")
    return member


