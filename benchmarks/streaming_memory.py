"""Peak memory of `evaluate` over image trees of two sizes, and decode against model speed.

    python benchmarks/streaming_memory.py                      # 5,000 and 50,000 JPEGs
    python benchmarks/streaming_memory.py --sizes 200 1000 --dir /tmp/trees   # a quick check

Writes class-folder trees of N JPEGs of 256 x 256 (10 classes; ``DIR/tree-N``, reused when
complete), a plain 10-class ConvMixer with 32 x 32 inputs (``DIR/model``, reused), runs
``convmixer-jax evaluate MODEL --data-dir TREE --resize 32`` on each tree in a process of its
own and prints each run's peak RSS (the process's own, from ``os.wait4``) and their ratio
(the acceptance bound is 1.10): streaming evaluation holds a few batches at a time, so the
memory does not grow with the images read, but a short run may end before the process
reaches the plateau a long one holds, which shows as a ratio above 1 (benchmarks/RESULTS.md
has runs with the RSS sampled over time). Then it times, in this process, decoding and
resizing the images in one thread (img/s per worker of the pipeline) against the model on
already-decoded batches (img/s of the model), both on the first tree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convmixer_jax import apply_cpu_flags  # noqa: E402

CLASSES = 10
DISTINCT = 500  # distinct JPEGs; a tree repeats them under new names (decoding is the same)


def _jpegs(size: int, seed: int = 0) -> list[bytes]:
    """``DISTINCT`` JPEG files of size x size: smooth random colour fields plus noise, quality
    90 (about the bytes per pixel of photos)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(DISTINCT):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        field = np.asarray(
            Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.int16
        )
        noisy = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_tree(root: Path, n: int, size: int) -> Path:
    """``root/test/class<c>/<i>.jpg``: n JPEGs of size x size over 10 classes (reused when the
    marker of a complete tree of this n and size is there)."""
    from tqdm.auto import tqdm

    marker = root / ".complete"
    if marker.is_file() and marker.read_text() == f"{n} {size}":
        return root
    blobs = _jpegs(size)
    for i in tqdm(range(n), desc=f"write {n} JPEGs", unit="img"):
        d = root / "test" / f"class{i % CLASSES}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(blobs[i % DISTINCT])
    marker.write_text(f"{n} {size}")
    return root


def make_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "convmixer_jax.cli", "init-model", "--out", str(path)]
            + ["--dim", "64", "--depth", "2", "--patch-size", "4", "--kernel-size", "5"]
            + ["--image-size", "32", "--num-classes", str(CLASSES)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return path


def peak_rss_of_evaluate(model: Path, tree: Path, args) -> tuple[float, dict, float]:
    """(peak RSS in MiB, the result JSON, wall seconds) of one `evaluate` process."""
    cmd = [sys.executable, "-m", "convmixer_jax.cli", "evaluate", str(model)]
    cmd += ["--data-dir", str(tree), "--resize", "32", "--quiet"]
    cmd += ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"evaluate failed ({proc.returncode}): {err.decode()[-2000:]}")
    return usage.ru_maxrss / 1024, json.loads(out.decode().strip().splitlines()[-1]), seconds


def speeds(model: Path, tree: Path, args) -> dict:
    """Decode + resize img/s in one thread (one worker's share) against the model's img/s on
    already-decoded batches."""
    from convmixer_jax.data import open_split
    from convmixer_jax.data.pipeline import batches
    from convmixer_jax.files.model_dir import load_model
    from convmixer_jax.model.inference import evaluate_batches

    split = open_split("test", data_dir=str(tree), resize=32, progress=False)
    n = min(len(split), args.speed_images)
    rows = np.arange(n)
    start = time.perf_counter()
    decoded = [
        b for b, _ in batches(split.images, batch_size=args.batch_size, indices=rows, threads=1)
    ]
    decode_s = time.perf_counter() - start
    images = np.concatenate(decoded)
    labels = split.labels[:n]
    config, variables, _ = load_model(model)
    warm = list(
        batches(images[: args.batch_size], labels[: args.batch_size], batch_size=args.batch_size)
    )
    evaluate_batches(config, variables, warm)  # compile once, outside the timing
    scores = evaluate_batches(
        config, variables, batches(images, labels, batch_size=args.batch_size)
    )
    return {
        "images": n,
        "decode_img_per_s_per_worker": n / decode_s,
        "model_img_per_s": n / scores["seconds"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[5000, 50000], metavar=("N1", "N2"))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--dir", help="where the trees and the model go (default: a temporary folder)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--speed-images", type=int, default=2000, help="images for the speed pass")
    args = p.parse_args(argv)
    apply_cpu_flags()
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(args.dir) if args.dir else Path(scratch)
        base.mkdir(parents=True, exist_ok=True)
        model = make_model(base / "model")
        runs = []
        for n in args.sizes:
            tree = make_tree(base / f"tree-{n}", n, args.image_size)
            rss, result, seconds = peak_rss_of_evaluate(model, tree, args)
            runs.append(
                {
                    "images": n,
                    "peak_rss_mib": rss,
                    "seconds": seconds,
                    "accuracy": result["accuracy"],
                    "top5": result["top5_accuracy"],
                }
            )
            print(
                f"evaluate over {n:,} JPEGs of {args.image_size}x{args.image_size}: peak RSS "
                f"{rss:,.0f} MiB, {seconds:.1f} s ({n / seconds:,.0f} img/s end to end)"
            )
        ratio = runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
        print(f"peak RSS ratio {args.sizes[1]:,} / {args.sizes[0]:,} images: {ratio:.3f}")
        speed = speeds(model, base / f"tree-{args.sizes[0]}", args)
        print(
            f"decode + resize: {speed['decode_img_per_s_per_worker']:,.0f} img/s per worker; "
            f"model: {speed['model_img_per_s']:,.0f} img/s "
            f"(workers to keep it fed: "
            f"{speed['model_img_per_s'] / speed['decode_img_per_s_per_worker']:.1f})"
        )
        print(
            json.dumps(
                {
                    "runs": runs,
                    "rss_ratio": ratio,
                    "speed": speed,
                    "batch_size": args.batch_size,
                    "workers": args.workers,
                    "cpu_count": os.cpu_count(),
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
