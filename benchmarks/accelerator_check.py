#!/usr/bin/env python
"""One accelerator check in minutes: device, JAX vs PyTorch, the 100-key sweep, the strong
recipe's training.

    python benchmarks/accelerator_check.py pack --data-dir ../shared/data/cifar10-jpeg \\
        --out cifar10-jpeg.tar.gz
    python3 benchmarks/accelerator_check.py run --archive cifar10-jpeg.tar.gz --out accel-out
    python benchmarks/accelerator_check.py run --dry-run --archive A.tar.gz --model MODEL_DIR \\
        --out OUT

``pack`` puts the JPEG copy of CIFAR-10 (class folders ``train/`` and ``test/``) into one
gzip tar archive, which a job carries to the accelerator machine.

``run`` does, each step in its own process group with its own time limit, within ``--budget``
seconds of wall time (default 450, so that the whole check ends within 8 minutes):

1. the device (``jax.devices()``, ``nvidia-smi -L``) and the versions;
2. ``benchmarks/bench.py`` on that device: JAX against PyTorch eager, and against
   ``torch.compile`` where PyTorch sees the accelerator -> ``bench.md``, ``bench.json``;
3. unpacks the archive;
4. the wrong-key sweep, ``convmixer-jax attack`` with 100 keys over the 10,000 test images
   on ``--model`` (default the committed ``results/cifar10/plain-model``) -> ``attack.json``;
5. a recipe from scratch (``--recipe``, default ``strong``, the committed model's: 100
   epochs, 5,000 training images held out) for as many epochs as fit in the time left,
   stopped by SIGTERM at the deadline -> ``train_log.json``, with the training seconds until
   the per-epoch accuracy first reached ``--target`` (0.90). That accuracy is the validation
   split's (of the EMA weights where the recipe keeps one) for a recipe that holds images
   out, whose test images are scored once, at the end; else the test accuracy of every
   epoch. Then the newest epoch checkpoint, finished or stopped, is exported
   (``export-model``, weights chosen as ``train`` chooses them) and scored on the test
   split (``evaluate``);
6. ``summary.json`` (rewritten after every step) and ``summary.md`` (also printed).

``--skip bench sweep`` gives training the whole budget. Everything goes into ``--out``,
at most 8 files (:data:`OUT_FILES`; every step's output is appended to ``steps.log``), so
that a remote job that returns at most 8 files brings all of them back. ``--dry-run`` runs
the same steps with tiny limits (a tiny bench model, 3 keys on 20 images, 2 epochs on 64
images in batches of 8 with the model's own architecture, 16 of them held out if the recipe
holds images out, 32 test images), its steps sharing one JAX compilation cache, so that CI
can rehearse the whole script on a CPU (``tests/test_accelerator_check.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "convmixer_jax.cli"]
ENV_PROBE = """
import json, shutil, subprocess, jax, jaxlib, flax, optax, numpy
import orbax.checkpoint as ocp
d = jax.devices()[0]
smi = None
if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax": ocp.__version__, "numpy": numpy.__version__}
print(json.dumps({"backend": jax.default_backend(), "devices": [str(x) for x in jax.devices()],
                  "device_kind": getattr(d, "device_kind", d.platform),
                  "device_count": jax.device_count(), "nvidia_smi": smi, "versions": versions}))
"""


def log(message: str) -> None:
    print(f"[accelerator_check] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pack


def pack(data_dir: Path, out: Path) -> dict:
    """``data_dir/{train,test}/<class>/*`` into the gzip tar ``out`` (top folder ``data``)."""
    for split in ("train", "test"):
        if not (data_dir / split).is_dir():
            raise SystemExit(
                f"error: {data_dir} has no {split}/ folder; give the JPEG copy's folder "
                "(class folders under train/ and test/)"
            )
    if out.exists():
        raise SystemExit(f"error: {out} exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    files = 0
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        for split in ("train", "test"):
            for path in sorted((data_dir / split).rglob("*")):
                if path.is_file():
                    tar.add(
                        path,
                        arcname=str(Path("data") / path.relative_to(data_dir)),
                        recursive=False,
                    )
                    files += 1
    os.replace(tmp, out)
    return {"archive": str(out), "files": files, "bytes": out.stat().st_size}


def unpack(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / "data"


# --------------------------------------------------------------------------- steps


#: Files ``run`` writes into ``--out``: at most 8, what a remote job returns at most.
OUT_FILES = (
    "steps.log",
    "bench.md",
    "bench.json",
    "attack.json",
    "train_log.json",
    "summary.json",
    "summary.md",
)


def step(
    name: str, argv: list[str], out: Path, timeout_s: float, env=None, grace_s: float = 15.0
) -> dict:
    """Run one step in its own process group; its stderr and stdout are appended to
    ``out/steps.log`` under a header. At ``timeout_s`` the group gets SIGTERM (training then
    keeps its complete epochs, as on Ctrl-C), and SIGKILL ``grace_s`` later."""
    t0 = time.perf_counter()
    log(f"{name}: {' '.join(argv)} (limit {timeout_s:.0f} s)")
    with open(out / "steps.log", "a") as f:
        f.write(f"===== {name}: {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=f,
            text=True,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        timed_out = False
        try:
            stdout, _ = proc.communicate(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(proc, signal.SIGTERM)
            try:
                stdout, _ = proc.communicate(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                try:
                    stdout, _ = proc.communicate(timeout=10)
                except subprocess.TimeoutExpired:  # a pipe held open by something outside the group
                    stdout = ""
        f.write(f"----- {name} stdout\n{stdout or ''}\n")
    seconds = time.perf_counter() - t0
    stopped = " (stopped at its time limit)" if timed_out else ""
    log(f"{name}: exit {proc.returncode}{stopped}, {seconds:.1f} s")
    return {
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "seconds": seconds,
        "stdout": stdout or "",
    }


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _parsed(what: str, parse, *args) -> dict:
    """``parse(*args)``, or ``{"error": ...}`` when a step's output is not what was expected:
    one step's surprise must not cost the steps after it."""
    try:
        return parse(*args)
    except Exception as e:  # noqa: BLE001 - recorded in the summary, and the run goes on
        log(f"{what}: could not read its output ({type(e).__name__}: {e})")
        return {"error": f"{type(e).__name__}: {e}"}


def _last_json(stdout: str) -> dict:
    """The last line of ``stdout`` that is a JSON object."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict):
            return found
    raise ValueError("no JSON line in the output")


def target_metric(recipe: dict) -> str:
    """The per-epoch accuracy a run is timed by: the validation split's (the EMA weights' if the
    recipe keeps an EMA) when the recipe holds images out, else the test split's."""
    if recipe.get("holdout"):
        return "val_accuracy_ema" if recipe.get("ema_decay") else "val_accuracy"
    return "test_accuracy"


def seconds_to_target(epochs: list[dict], target: float, metric: str = "test_accuracy") -> dict:
    """Training seconds (per-epoch evaluation not counted) until ``metric`` first reached
    ``target``."""
    total = 0.0
    for e in epochs:
        total += e["train_seconds"]
        if e.get(metric) is not None and e[metric] >= target:
            return {
                "target": target,
                "metric": metric,
                "reached": True,
                "epoch": e["epoch"],
                "train_seconds": total,
            }
    best = max((e.get(metric) or 0.0 for e in epochs), default=None)
    return {
        "target": target,
        "metric": metric,
        "reached": False,
        "epoch": None,
        "train_seconds": None,
        "best": best,
    }


def dry_run_compilation_cache(folder: Path) -> dict[str, str]:
    """Environment variables that give the dry run's steps one JAX persistent compilation cache
    in ``folder`` and write every program to it (by default JAX writes only those that took
    over a second to compile).

    A step then loads what an earlier one compiled instead of compiling it again (the
    initializer's programs; with bench.py --tiny's model also the training step), which is
    most of a CPU rehearsal's time. The real run leaves the cache alone: its steps compile
    as a fresh job's do, and bench.py reports that compile time.
    """
    return {
        "JAX_COMPILATION_CACHE_DIR": str(folder),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def _model_arch(model_dir: Path) -> list[str]:
    config = json.loads((model_dir / "config.json").read_text())["model"]
    names = (
        "dim",
        "depth",
        "kernel_size",
        "patch_size",
        "num_classes",
        "image_size",
        "channels",
        "activation",
    )
    return [x for n in names if n in config for x in (f"--{n.replace('_', '-')}", str(config[n]))]


def run(args) -> dict:
    start = time.perf_counter()

    def left() -> float:
        """Seconds of ``--budget`` still left."""
        return args.budget - (time.perf_counter() - start)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} exists and is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cmj-accel-"))
    env = dict(
        os.environ,
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
        PYTHONUNBUFFERED="1",
        CONVMIXER_JAX_CACHE=str(work / "cache"),
    )
    if not args.dry_run:
        # the package's XLA:CPU flag is for the jaxlib pinned in pyproject.toml; an accelerator
        # image may carry another jaxlib
        env["CONVMIXER_JAX_KEEP_XLA_FLAGS"] = "1"
    else:
        for name, value in dry_run_compilation_cache(work / "jax-cache").items():
            env.setdefault(name, value)  # a cache the caller set up (and perhaps filled) is kept
    summary: dict = {
        "dry_run": args.dry_run,
        "budget_s": args.budget,
        "command": " ".join(sys.argv),
    }
    try:
        # 1. the device
        r = step("env", [sys.executable, "-c", ENV_PROBE], out, 120, env)
        device = (
            _parsed("env", _last_json, r["stdout"])
            if r["returncode"] == 0
            else {"error": r["returncode"]}
        )
        device = None if "error" in device else device
        summary["device"] = device
        _write_summary(out, summary)
        print(
            f"device: {device['device_kind'] if device else 'unknown'} "
            f"({device and device['backend']}), {device and device['device_count']} device(s)",
            flush=True,
        )
        accelerator = bool(device and device["backend"] != "cpu")

        # 2. JAX vs PyTorch on this device
        bench = [
            sys.executable,
            str(ROOT / "benchmarks" / "bench.py"),
            "--skip-sweep",
            "--skip-blockwise",
            "--skip-alt",
            "--out",
            str(out / "bench.md"),
            "--json",
            str(out / "bench.json"),
        ]
        if args.dry_run:
            bench += [
                "--quick",
                "--tiny",
                "--rounds",
                "1",
                "--train-steps",
                "1",
                "--infer-steps",
                "1",
                "--warmup",
                "0",
            ]
        elif accelerator:
            bench += [
                "--torch-compile"
            ]  # bench.py times eager and compiled; CPU torch is skipped there
        if "bench" in args.skip:
            summary["bench"] = {"skipped": True}
        else:
            r = step("bench", bench, out, min(args.bench_limit, max(left() - 60, 30)), env)
            summary["bench"] = (
                _parsed("bench", _bench_summary, out / "bench.json")
                if r["returncode"] == 0
                else {"error": r["returncode"]}
            )
        _write_summary(out, summary)

        # 3. the data
        t0 = time.perf_counter()
        data = unpack(Path(args.archive), work)
        summary["data"] = {
            "archive": str(args.archive),
            "archive_bytes": Path(args.archive).stat().st_size,
            "unpack_seconds": time.perf_counter() - t0,
        }

        # 4. the wrong-key sweep
        keys, limit = (3, ["--limit", "20"]) if args.dry_run else (args.num_keys, [])
        chunk, batch = (2, 40) if args.dry_run else (args.key_chunk, args.key_chunk * 1000)
        attack = CLI + [
            "attack",
            str(args.model),
            "--data-dir",
            str(data),
            "--num-keys",
            str(keys),
            "--key-seed",
            str(args.key_seed),
            "--key-chunk",
            str(chunk),
            "--batch-size",
            str(batch),
            *limit,
            "--quiet",
            "--out",
            str(out / "attack.json"),
        ]
        if "sweep" in args.skip:
            summary["sweep"] = {"skipped": True}
        else:
            r = step("attack", attack, out, max(min(args.attack_limit, left() - 60), 30), env)
            summary["sweep"] = (
                _parsed("attack", _attack_summary, out / "attack.json")
                if r["returncode"] == 0
                else {"error": r["returncode"]}
            )
        _write_summary(out, summary)

        # 5. the recipe for as many epochs as fit
        if args.dry_run:
            # batch 8, bench.py --tiny's: with the bench's model (tests/test_accelerator_check.py
            # uses it) the paper recipe's training step is the bench's program, found in the cache.
            train_opts = [
                *_model_arch(Path(args.model)),
                "--epochs",
                "2",
                "--train-batch-size",
                "8",
                "--limit-train",
                "64",
                "--limit-test",
                "32",
            ]
            if _recipes()[args.recipe].holdout:
                train_opts += ["--holdout", "16"]
        else:
            train_opts = ["--preset", "paper"] + (
                ["--epochs", str(args.epochs)] if args.epochs else []
            )
        train = CLI + [
            "train",
            "--data-dir",
            str(data),
            "--recipe",
            args.recipe,
            "--seed",
            "0",
            *train_opts,
            "--workdir",
            str(work / "train"),
            "--out",
            str(work / "model"),
            "--quiet",
        ]
        limit_s = max(left() - args.margin, 10)
        r = step(
            "train", train, out, limit_s, env, grace_s=60
        )  # a checkpoint save may be under way
        log_file = work / "train" / "train_log.json"
        if log_file.exists():
            shutil.copy(log_file, out / "train_log.json")
            summary["train"] = _parsed("train", _train_summary, log_file, r, args, limit_s)
            _write_summary(out, summary)
            # The newest checkpoint scored on the test split, whether the run finished or was
            # stopped at the limit: export-model chooses its weights as train does.
            if "error" not in summary["train"]:
                summary["train"]["final"] = _final_test_accuracy(
                    work, data, out, env, left, args.dry_run
                )
        else:
            summary["train"] = {"error": r["returncode"], "epochs_done": 0}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["wall_seconds"] = time.perf_counter() - start
    _write_summary(out, summary)
    text = summary_markdown(summary)
    (out / "summary.md").write_text(text)
    print(text, flush=True)
    return summary


def _write_summary(out: Path, summary: dict) -> None:
    """summary.json as it stands, after every step: a run killed from outside keeps what it
    measured."""
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def _train_summary(log_file: Path, r: dict, args, limit_s: float) -> dict:
    history = json.loads(log_file.read_text())
    epochs = history["epochs"]
    metric = target_metric(history["recipe"])
    t = {
        "recipe": args.recipe,
        "epochs_done": len(epochs),
        "epochs_planned": history["recipe"]["epochs"],
        "time_limit_s": limit_s,
        "stopped_at_limit": r["timed_out"],
        "returncode": r["returncode"],
        "train_images": history.get("train_images"),
        "images_per_second": [e["images_per_second"] for e in epochs],
        "metric": metric,
        "accuracy": [e.get(metric) for e in epochs],
        "to_target": seconds_to_target(epochs, args.target, metric),
    }
    if r["returncode"] != 0 and not r["timed_out"]:
        t["error"] = r["returncode"]  # train failed for another reason than the time limit
    return t


def _final_test_accuracy(work: Path, data: Path, out: Path, env, left, dry_run: bool) -> dict:
    """export-model of the newest epoch checkpoint, then evaluate on the test split (the dry
    run's 32 images are train's --limit-test 32 at seed 0)."""
    model = work / "final-model"
    r = step(
        "export",
        CLI + ["export-model", "--workdir", str(work / "train"), "--out", str(model)],
        out,
        max(min(90.0, left() - 5), 10),
        env,
    )
    if r["returncode"] != 0:
        return {"error": f"export-model exited {r['returncode']}"}
    exported = _parsed("export", _last_json, r["stdout"])
    limit = ["--limit", "32", "--seed", "0"] if dry_run else []
    r = step(
        "evaluate",
        CLI + ["evaluate", str(model), "--data-dir", str(data), *limit, "--quiet"],
        out,
        max(left() - 5, 10),
        env,
    )
    if r["returncode"] != 0:
        return {"error": f"evaluate exited {r['returncode']}", "epoch": exported.get("epoch")}
    result = _parsed("evaluate", _last_json, r["stdout"])
    return {
        "epoch": exported.get("epoch"),
        "of": exported.get("of"),
        "test_accuracy": result.get("accuracy"),
        "test_images": result.get("images"),
    }


def _bench_summary(path: Path) -> dict:
    b = json.loads(path.read_text())["model"]
    r = b["results"]
    out = {
        "batch": b["batch"],
        "tiny": b.get("tiny", False),
        "depthwise_impl": b["depthwise_impl"],
        "jax_train_images_per_s": r["jax_train"]["images_per_s"],
        "jax_infer_images_per_s": r["jax_infer"]["images_per_s"],
    }
    for key in ("train_ratio", "infer_ratio", "train_ratio_compile", "infer_ratio_compile"):
        out[key] = b.get(key)
    return out


def _attack_summary(path: Path) -> dict:
    a = json.loads(path.read_text())
    return {
        k: a[k]
        for k in (
            "num_keys",
            "test_images",
            "seconds",
            "key_image_pairs_per_second",
            "median",
            "min",
            "max",
            "device",
            "accuracies",
            "key_seed",
        )
    }


def summary_markdown(s: dict) -> str:
    d = s.get("device") or {}
    dry = " (dry run: tiny limits, not a measurement)" if s["dry_run"] else ""
    L = [
        f"# Accelerator check{dry}",
        "",
        f"- Device: {d.get('device_kind')} ({d.get('backend')}), "
        f"{d.get('device_count')} device(s); nvidia-smi: {d.get('nvidia_smi')}",
        f"- Versions: {d.get('versions')}",
        f"- Wall time: {s['wall_seconds']:.0f} s of a {s['budget_s']:.0f} s budget",
        f"- Command: `{s['command']}`",
        "",
    ]
    b = s.get("bench") or {}
    if "jax_train_images_per_s" in b:

        def fmt(v) -> str:
            return "n/a" if v is None else f"{v:.2f}"

        L += [
            f"bench.py (batch {b['batch']}{', tiny model' if b['tiny'] else ', ConvMixer-256/8'}, "
            f"depthwise {b['depthwise_impl']}): JAX training {b['jax_train_images_per_s']:.0f} "
            f"img/s, inference {b['jax_infer_images_per_s']:.0f} img/s; JAX / PyTorch eager: "
            f"training {fmt(b['train_ratio'])}, inference {fmt(b['infer_ratio'])}; JAX / "
            f"torch.compile: training {fmt(b['train_ratio_compile'])}, inference "
            f"{fmt(b['infer_ratio_compile'])}.",
            "",
        ]
    w = s.get("sweep") or {}
    if "num_keys" in w:
        L += [
            f"Wrong-key sweep: {w['num_keys']} keys x {w['test_images']:,} test images in "
            f"{w['seconds']:.1f} s ({w['key_image_pairs_per_second']:,.0f} key-image pairs/s); "
            f"accuracies median {w['median']:.4f}, min {w['min']:.4f}, max {w['max']:.4f}.",
            "",
        ]
    t = s.get("train") or {}
    if t.get("epochs_done"):
        tt, what = t["to_target"], t["metric"].replace("_", " ")
        reached = (
            f"{what} {tt['target']:.2f} first reached after epoch {tt['epoch']}, "
            f"{tt['train_seconds']:.1f} s of training (per-epoch evaluation not counted)"
            if tt["reached"]
            else f"{what} {tt['target']:.2f} not reached (best {tt['best']:.4f})"
        )
        f = t.get("final") or {}
        final = (
            "; the final model was not scored" + (f" ({f['error']})" if f.get("error") else "")
            if f.get("test_accuracy") is None
            else f"; the newest checkpoint (epoch {f['epoch']} of {f['of']}) scores test accuracy "
            f"{f['test_accuracy']:.4f} on {f['test_images']:,} test images"
        )
        L += [
            f"Recipe {t['recipe']}: {t['epochs_done']} of {t['epochs_planned']} epochs in the "
            f"{t['time_limit_s']:.0f} s left{' (stopped there)' if t['stopped_at_limit'] else ''}, "
            f"last {what} {t['accuracy'][-1]:.4f}, {t['images_per_second'][-1]:,.0f} img/s in the "
            f"last epoch; {reached}{final}.",
            "",
        ]
    return "\n".join(L)


def _recipes() -> dict:
    """The package's recipe registry, from this checkout. Importing it does not import JAX, so
    this process never touches the accelerator: the steps' processes have it to themselves."""
    sys.path.insert(0, str(ROOT))
    from convmixer_jax.training.recipes import RECIPES

    return RECIPES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("pack", help="pack the JPEG copy into one archive to carry")
    k.add_argument(
        "--data-dir", required=True, type=Path, help="folder with train/ and test/ class folders"
    )
    k.add_argument("--out", required=True, type=Path, help="archive to write (.tar.gz)")
    r = sub.add_parser("run", help="the check itself")
    r.add_argument("--archive", required=True, type=Path, help="the archive made by pack")
    r.add_argument("--out", required=True, type=Path, help="results folder (new or empty)")
    r.add_argument(
        "--model",
        type=Path,
        default=ROOT / "results" / "cifar10" / "plain-model",
        help="the model the sweep attacks (default: the committed CIFAR-10 model)",
    )
    r.add_argument(
        "--budget", type=float, default=450.0, help="seconds of wall time for everything (450)"
    )
    r.add_argument(
        "--margin",
        type=float,
        default=60.0,
        help="seconds kept after training to export and score its newest checkpoint (60)",
    )
    r.add_argument(
        "--skip",
        nargs="+",
        choices=["bench", "sweep"],
        default=[],
        help="leave out these steps, e.g. to give the whole budget to training",
    )
    r.add_argument(
        "--bench-limit", type=float, default=150.0, help="seconds at most for bench.py (150)"
    )
    r.add_argument(
        "--attack-limit", type=float, default=120.0, help="seconds at most for the sweep (120)"
    )
    r.add_argument("--num-keys", type=int, default=100, help="wrong keys of the sweep (100)")
    r.add_argument(
        "--key-chunk", type=int, default=25, help="keys per call of the sweep, x 1000 images (25)"
    )
    r.add_argument("--key-seed", type=int, default=1, help="seed of the sweep's keys (1)")
    r.add_argument(
        "--recipe",
        choices=list(_recipes()),
        default="strong",
        help="training recipe (default strong, the committed model's recipe)",
    )
    r.add_argument(
        "--epochs", type=int, default=None, help="epochs planned (default: the recipe's)"
    )
    r.add_argument(
        "--target",
        type=float,
        default=0.90,
        help="accuracy to time (0.90): validation for a recipe that holds images out, else test",
    )
    r.add_argument(
        "--dry-run", action="store_true", help="tiny limits: rehearse every step on a CPU"
    )
    args = p.parse_args(argv)
    if args.what == "run":
        for name in ("archive", "model"):
            if not getattr(args, name).exists():
                p.error(f"--{name} {getattr(args, name)} does not exist")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.what == "pack":
        print(json.dumps(pack(args.data_dir, args.out)))
        return 0
    summary = run(args)
    failed = [
        name
        for name in ("bench", "sweep", "train")
        if "error" in (summary.get(name) or {"error": 1})
        or (name == "train" and "error" in (summary["train"].get("final") or {}))
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
