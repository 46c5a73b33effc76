"""``pil``: the seed notebook's pipeline, kept plain as the baseline every benchmark compares to.

A Dataset over the raw image folder (the manifest's ``image_dir``, or ``folder=``) restricted to the
split's files in natural order; PIL open + convert("RGB"), Resize + CenterCrop (fastceleba.transforms)
+ ToTensor; a torch DataLoader with ``num_workers`` processes. No Normalize to [-1, 1] (the notebook
normalizes, but its models end in a sigmoid). Batches carry image, num (from the file name) and
valid only: attr/ident live in the shards. The DataLoader's batch sampler replays the epoch plan;
this module never orders, shards or pads on its own, and never reads the shards' images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
# At the top, not in the workers: DataLoader forks its workers from this process every epoch, and each
# would otherwise import torchvision (~1 s) again, halving this baseline's images/s.
from torchvision.transforms import functional as TF

from ..celeba import image_number, natural_key
from ..errors import DataError
from ..shards import MANIFEST
from ..transforms import check_geometry, resize_crop
from .base import Loader, own_generator, to_device, worker_error
from .plan import split_batches
from .split import SplitData


class _FolderDataset(torch.utils.data.Dataset):
    """The notebook's CelebADataset, restricted to a list of names; items are (index, valid, flip)."""

    def __init__(self, folder: Path, names: list[str], size: int, crop: int | None):
        self.folder, self.names, self.size, self.crop = folder, names, size, crop

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, item: tuple[int, bool, bool]) -> dict[str, Any]:
        index, valid, flip = item
        name = self.names[index]
        path = self.folder / name
        try:
            with Image.open(path) as raw:
                check_geometry(raw.height, raw.width, self.size, self.crop, str(path))
                img = resize_crop(raw.convert("RGB"), self.size, self.crop)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable image ({e}); replace it or re-download CelebA") from None
        if flip:
            img = TF.hflip(img)
        return {"image": TF.to_tensor(img), "num": torch.tensor(image_number(name), dtype=torch.int32),
                "valid": torch.tensor(bool(valid))}


class _PlanBatches(torch.utils.data.Sampler):
    """Batch sampler yielding the loader's plan for the epoch it is told."""

    def __init__(self, loader: "PilLoader"):
        self.loader, self.epoch, self.start = loader, 0, 0

    def __len__(self) -> int:
        return self.loader.num_batches

    def __iter__(self):
        idx, valid = self.loader._plan(self.epoch, self.start)
        flips = self.loader._flips(self.epoch)
        for s in split_batches(len(idx), self.loader.batch_size):
            yield [(int(i), bool(v), bool(flips[i])) for i, v in zip(idx[s], valid[s])]


def _image_folder(sd: SplitData) -> Path:
    """The folder the shards were made from: as seen from the shards first (it holds wherever the
    two sit side by side, on any node), else the absolute path recorded when they were made."""
    recorded = [sd.root / sd.manifest["image_dir_relative"]] if "image_dir_relative" in sd.manifest else []
    recorded.append(Path(sd.manifest["image_dir"]))
    for folder in recorded:
        if folder.is_dir():
            return folder
    raise DataError(f"{recorded[-1]}: image folder not found (nor {recorded[0]}; recorded in "
                    f"{sd.root / MANIFEST}); pass folder= (bench: --folder) pointing at img_align_celeba")


class PilLoader(Loader):
    kind = "pil"

    def __init__(self, sd: SplitData, folder: Path | None, **kw):
        folder = Path(folder) if folder else _image_folder(sd)
        if not folder.is_dir():
            raise DataError(f"{folder}: image folder not found; pass folder= (bench: --folder) pointing at "
                            "img_align_celeba")
        names = sorted(sd.keys, key=natural_key)  # the notebook's natsorted order
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DataError(f"{folder / missing[0]}: missing ({len(missing)} of the split's images are); "
                            "pass the folder the shards were made from")
        super().__init__(sd, len(names), **kw)
        self.folder, self.names = folder, names
        self._sampler = _PlanBatches(self)
        self._dataset = _FolderDataset(folder, names, self.size, self.crop)

    def _run_epoch(self, epoch: int, start: int):
        self._sampler.epoch, self._sampler.start = epoch, start
        dl = torch.utils.data.DataLoader(
            self._dataset, batch_sampler=self._sampler, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", generator=own_generator(self.seed, epoch),
        )
        try:
            for batch in dl:
                yield to_device(batch, self.device)
        except DataError as e:
            raise worker_error(e) from None


