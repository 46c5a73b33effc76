"""Test helper: run fastceleba/train.py's job, then write this rank's weight hash to OUT/weights-rank{R}.sha256.

Launched by tests/test_train.py with `accelerate launch --multi_gpu --num_processes 2` to check that the
replicas of a multi-process run hold identical weights at the end. Arguments are train.py's.
"""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not

from fastceleba.train import parse_args, train  # noqa: E402


def main() -> None:
    args = parse_args(sys.argv[1:])
    model, summary = train(args)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    from accelerate import PartialState

    rank = PartialState().process_index
    Path(args.out, f"weights-rank{rank}.sha256").write_text(digest.hexdigest() + "\n")


if __name__ == "__main__":
    main()
