#!/usr/bin/env python
"""Wrong-key sweep throughput and peak memory.

    python benchmarks/sweep.py [--images 10000] [--num-keys 10,100] [--images-keys 10]
                               [--loop-keys 4] [--key-chunk 4] [--batch-size 125]
                               [--model results/cifar10/plain-model]
                               [--data-dir ../shared/data/cifar10-jpeg]
                               [--out benchmarks/RESULTS.md]

``benchmarks/bench.py`` runs the same measurements as part of its one-command
section; this script runs them alone. Each case runs in a fresh subprocess so
that its memory is its own (peak RSS while the case runs, after loading;
on a GPU also the device's ``peak_bytes_in_use``):

- single-key inference: images/s of the encrypted model on its own encrypted
  test images (the best of batch 128, 250 and 500, as ``evaluate`` would run);
- the sweep (``convmixer_jax.attacks.wrong_keys.wrong_key_accuracies``): the ``weights``
  strategy (the default of ``attack``) for each N in ``--num-keys`` and the
  ``images`` strategy for each N in ``--images-keys``: key-image pairs/s;
- a Python loop of per-key jitted calls (``wrong_key_accuracies_loop``) over
  ``--loop-keys`` keys: key-image pairs/s.

Without ``--model`` (or when it does not exist) a randomly initialized paper
model is timed (throughput does not depend on the weights); without the data
directory, random uint8 images are used.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SINGLE_BATCHES = (128, 250, 500)


def _vm_mib(field: str) -> float | None:
    """VmHWM (peak) or VmRSS (current) of this process in MiB, from /proc (Linux).

    ``ru_maxrss`` is not used: Linux carries it across fork + exec, so a child
    of a large parent (bench.py holds PyTorch) reports the parent's peak.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _case(args) -> dict:
    """Run one case in this process and return its numbers (called in a subprocess)."""
    sys.path.insert(0, str(ROOT))
    from convmixer_jax import apply_cpu_flags

    apply_cpu_flags()  # the XLA:CPU flag a user of the command line gets, before JAX starts
    import jax
    import numpy as np

    from convmixer_jax.attacks.wrong_keys import (
        draw_attack_keys,
        wrong_key_accuracies,
        wrong_key_accuracies_loop,
    )
    from convmixer_jax.model.convmixer import PRESETS
    from convmixer_jax.model.inference import accuracy
    from convmixer_jax.scheme.images import encrypt_images
    from convmixer_jax.scheme.keys import generate_key
    from convmixer_jax.scheme.params import encrypt_params
    from convmixer_jax.training.loop import init_variables

    if args.model and Path(args.model).exists():
        from convmixer_jax.files.model_dir import load_model

        config, variables, _ = load_model(args.model)
    else:
        config, variables = PRESETS["paper"], init_variables(PRESETS["paper"], 0)
    if args.data_dir and Path(args.data_dir).exists():
        from convmixer_jax.data import load_split, subset

        images, labels, _ = load_split("test", data_dir=args.data_dir)
        images, labels = subset(images, labels, args.images, 0)
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(
            0,
            256,
            (args.images, config.image_size, config.image_size, config.channels),
            dtype=np.uint8,
        )
        labels = rng.integers(0, config.num_classes, args.images)
    secret = generate_key(config.patch_size, config.channels, seed=[1, 2])
    enc = encrypt_params(variables, secret, mean=config.mean, std=config.std)
    n = len(images)
    out = {"case": args.case, "keys": args.n, "images": n}
    # Peak memory of the measured phase only: data, model and keys are loaded.
    out["rss_before_mib"] = _vm_mib("VmRSS")
    out["phase_peak_reset"] = _reset_peak()
    if args.case == "single":
        enc_images = np.asarray(encrypt_images(images, secret))
        best = None
        for bs in SINGLE_BATCHES:
            accuracy(config, enc, enc_images[:bs], labels[:bs], batch_size=bs)
            t0 = time.perf_counter()
            acc = accuracy(config, enc, enc_images, labels, batch_size=bs)
            sec = time.perf_counter() - t0
            out[f"rate_batch_{bs}"] = n / sec
            if best is None or n / sec > out["rate"]:
                best, out["rate"], out["seconds"], out["batch_size"], out["accuracy"] = (
                    bs,
                    n / sec,
                    sec,
                    bs,
                    acc,
                )
    else:
        keys = draw_attack_keys(3, args.n, config.patch_size, config.channels)
        warm = draw_attack_keys(4, 1, config.patch_size, config.channels)
        if args.case == "loop":
            wrong_key_accuracies_loop(
                config,
                enc,
                images[: args.batch_size],
                labels[: args.batch_size],
                warm,
                batch_size=250,
            )
            t0 = time.perf_counter()
            acc = wrong_key_accuracies_loop(config, enc, images, labels, keys, batch_size=250)
            out["batch_size"] = 250
        else:
            wrong_key_accuracies(
                config,
                enc,
                images[: args.batch_size],
                labels[: args.batch_size],
                warm,
                strategy=args.case,
                key_chunk=args.key_chunk,
                batch_size=args.batch_size,
            )
            t0 = time.perf_counter()
            acc = wrong_key_accuracies(
                config,
                enc,
                images,
                labels,
                keys,
                strategy=args.case,
                key_chunk=args.key_chunk,
                batch_size=args.batch_size,
            )
            out["batch_size"], out["key_chunk"] = args.batch_size, args.key_chunk
        out["seconds"] = time.perf_counter() - t0
        out["rate"] = n * args.n / out["seconds"]
        out["accuracy_median"] = float(np.median(acc))
        out["accuracy_max"] = float(np.max(acc))
    out["peak_rss_mib"] = _vm_mib("VmHWM") if out["phase_peak_reset"] else None
    out["process_peak_rss_mib"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if not out["phase_peak_reset"]
        else None
    )
    dev = jax.devices()[0]
    out["devices"] = [str(d) for d in jax.devices()]
    out["device_kind"] = getattr(dev, "device_kind", dev.platform)
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    out["peak_device_mib"] = (
        stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None
    )
    return out


def run_case(settings: dict, case: str, n: int, log=print) -> dict:
    """One case in a fresh subprocess; ``settings``: images, key_chunk, batch_size, model,
    data_dir."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_case",
        case,
        "--_n",
        str(n),
        "--images",
        str(settings["images"]),
        "--key-chunk",
        str(settings["key_chunk"]),
        "--batch-size",
        str(settings["batch_size"]),
        "--model",
        settings.get("model") or "",
        "--data-dir",
        settings.get("data_dir") or "",
    ]
    log(f"[sweep] {case} N={n} on {settings['images']:,} images ...")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"sweep case {case} N={n} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    log(
        f"[sweep] {case} N={n}: {row['rate']:.1f}/s, peak RSS {_mib(row.get('peak_rss_mib'))} MiB "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    return row


def run_sweep(
    settings: dict, num_keys=(10, 100), images_keys=(10,), loop_keys: int = 4, log=print
) -> dict:
    """All cases: single-key inference, weights for each N, images for each N, the loop."""
    rows = [run_case(settings, "single", 1, log)]
    rows += [run_case(settings, "weights", n, log) for n in num_keys]
    rows += [run_case(settings, "images", n, log) for n in images_keys]
    if loop_keys:
        rows.append(run_case(settings, "loop", loop_keys, log))
    single = rows[0]
    for r in rows:
        r["vs_single"] = r["rate"] / single["rate"]
    model = settings.get("model")
    return {
        "settings": {
            **settings,
            "model": model if model and Path(model).exists() else "random paper preset",
        },
        "rows": rows,
    }


def _ints(text: str) -> tuple[int, ...]:
    """'10,100' -> (10, 100); '' -> ()."""
    return tuple(int(v) for v in text.split(",") if v.strip())


def _mib(v) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def markdown(res: dict, heading: str = "###") -> str:
    s, rows = res["settings"], res["rows"]
    single = rows[0]
    gpu = any(r.get("peak_device_mib") for r in rows)
    L = [
        f"{heading} Wrong-key sweep, {s['images']:,} test images, model: {s['model']}\n",
        "Key-image pairs/s of `convmixer_jax.attacks.wrong_keys.wrong_key_accuracies` "
        "(accuracy of the encrypted model on images under each wrong key), keys folded "
        f"into the batch, {s['key_chunk']} keys x {s['batch_size']} images per call; "
        "against the single-key inference throughput of the encrypted model on its own "
        f"encrypted images (best of batch {', '.join(map(str, SINGLE_BATCHES))}: "
        + ", ".join(f"{single[f'rate_batch_{b}']:.1f} at {b}" for b in SINGLE_BATCHES)
        + " img/s). Each case runs in a fresh process. Memory: RSS after loading the model, the "
        f"{s['images']:,} test images and the keys, and the peak RSS while the "
        "case ran (Linux VmHWM, reset with /proc/self/clear_refs after loading)"
        + ("; peak device memory is the GPU's `peak_bytes_in_use`" if gpu else "")
        + ".\n",
        "| case | keys N | images | key-image pairs/s (img/s for one key) "
        "| vs single-key inference | seconds | RSS before MiB | peak RSS MiB |"
        + (" peak device MiB |" if gpu else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if gpu else ""),
    ]
    names = {
        "single": "single key (inference)",
        "weights": "sweep, strategy weights",
        "images": "sweep, strategy images",
        "loop": "Python loop of per-key jitted calls",
    }
    for r in rows:
        line = (
            f"| {names[r['case']]} | {r['keys']} | {r['images']:,} | "
            f"{r['rate']:.1f} | {r['vs_single']:.2f} | {r['seconds']:.0f} | "
            f"{_mib(r.get('rss_before_mib'))} | {_mib(r.get('peak_rss_mib'))} |"
        )
        if gpu:
            line += f" {r['peak_device_mib']:.0f} |" if r.get("peak_device_mib") else " n/a |"
        L.append(line)
    sweeps = [r for r in rows if r["case"] != "single"]
    L.append("")
    L.append(
        "Wrong-key accuracy medians (a check that the sweep computed something): "
        + "; ".join(
            f"{r['case']} N={r['keys']}: median "
            f"{r['accuracy_median']:.3f}, max {r['accuracy_max']:.3f}"
            for r in sweeps
        )
        + f"; the secret key: {single['accuracy']:.3f}."
    )
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--num-keys", default="10,100", help="N values for the weights strategy")
    p.add_argument(
        "--images-keys", default="10", help="N values for the images strategy ('' for none)"
    )
    p.add_argument("--loop-keys", type=int, default=4)
    p.add_argument("--key-chunk", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=125)
    p.add_argument("--model", default=str(ROOT / "results/cifar10/plain-model"))
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/cifar10-jpeg"))
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--_case", help=argparse.SUPPRESS)
    p.add_argument("--_n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._case:
        args.case, args.n = args._case, args._n
        print(json.dumps(_case(args)))
        return 0
    settings = {
        "images": args.images,
        "key_chunk": args.key_chunk,
        "batch_size": args.batch_size,
        "model": args.model,
        "data_dir": args.data_dir,
    }
    res = run_sweep(
        settings,
        _ints(args.num_keys),
        _ints(args.images_keys),
        args.loop_keys,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    head = (
        f"## {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC: wrong-key sweep only, "
        f"{platform.processor() or platform.machine()}, {res['rows'][0]['device_kind']}\n\n"
        f"- Command: `{shlex.join([sys.executable] + sys.argv)}`\n\n"
    )
    text = head + markdown(res)
    with open(args.out, "a") as f:
        f.write("\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
