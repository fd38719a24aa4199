"""The commands of the multi-process test: run by tests/test_multiprocess.py in one process
and by tests/multiprocess_worker.py in each process of a group (a plain module, not a test
module)."""

from __future__ import annotations

from pathlib import Path


def commands(root, tag: str) -> list[list[str]]:
    """The commands each process runs; outputs relative to the current folder, named by ``tag``."""
    root = Path(root)
    data = ["--data-dir", str(root / "data"), "--quiet"]
    arch = [
        "--dim",
        "8",
        "--depth",
        "1",
        "--kernel-size",
        "3",
        "--patch-size",
        "2",
        "--num-classes",
        "3",
        "--image-size",
        "8",
    ]
    return [
        [
            "attack",
            str(root / "model"),
            *data,
            "--num-keys",
            "6",
            "--key-seed",
            "3",
            "--key-chunk",
            "2",
            "--batch-size",
            "16",
            "--out",
            f"attack-{tag}.json",
        ],
        [
            "evaluate",
            str(root / "model"),
            *data,
            "--batch-size",
            "10",
            "--out",
            f"evaluate-{tag}.json",
        ],
        # as many wrong keys as attack: drawing them reuses attack's compiled programs in this
        # process
        [
            "reproduce",
            "--checkpoint",
            str(root / "model"),
            *data,
            "--num-keys",
            "6",
            "--key-seed",
            "5",
            "--out",
            f"reproduce-{tag}",
        ],
        [
            "train",
            *data,
            *arch,
            "--recipe",
            "fast",
            "--epochs",
            "1",
            "--train-batch-size",
            "16",
            "--limit-train",
            "32",
            "--seed",
            "2",
            "--workdir",
            str(root / f"work-{tag}"),
            "--out",
            f"trained-{tag}",
        ],
        # resume a finished run's checkpoint: restores it (written by one process for "two") and
        # saves it
        [
            "train",
            *data,
            *arch,
            "--recipe",
            "fast",
            "--epochs",
            "1",
            "--train-batch-size",
            "16",
            "--limit-train",
            "32",
            "--seed",
            "2",
            "--resume",
            "--workdir",
            str(root / ("work-one" if tag == "two" else f"work-{tag}")),
            "--out",
            f"resumed-{tag}",
        ],
    ]
