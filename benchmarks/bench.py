#!/usr/bin/env python
"""One-command benchmark of convmixer-jax against PyTorch eager on this machine.

    python benchmarks/bench.py [--quick] [--out benchmarks/RESULTS.md] [--json results.json]

Measures, in one process and with the JAX and PyTorch rounds interleaved:

1. ConvMixer-256/8 (k=9, p=4, 32x32x3, 10 classes), batch 128, float32:
   - training step images/s: the library's own jitted train step
     (``convmixer_jax.training.loop.make_step`` with ``RECIPES['paper']``: Adam, lr 1e-3,
     no augmentation, single-device mesh shardings) against PyTorch eager,
     channels_last ((x-0.5)/0.5, forward, cross-entropy, backward, Adam step);
   - inference images/s: jitted ``ConvMixer.apply(train=False)`` on
     ``prepare_inference`` variables (depthwise matrices built once per set of
     weights, as predict / evaluate / attack run it) against PyTorch eval mode
     under ``torch.inference_mode()``, channels_last; and the same apply on the
     plain variables (matrices rebuilt every call), in the same rounds;
   - one inference row with the other depthwise formulation (on CPU the XLA
     grouped convolution, to show why the dense Toeplitz form is used).
   Before timing, the JAX parameters are copied into the PyTorch model and the
   eval logits of both are compared on a random batch (must agree to 1e-3).
2. Block-wise image transform bandwidth (10,000 x 32 x 32 x 3, M = 4, uint8
   and float32): jitted ``encrypt_images`` and a vmapped batch of 8 keys on
   1,000 images, against plain memory copies (numpy ``np.copyto`` into a
   preallocated array, jitted JAX ``x + 0`` and ``jnp.copy``).
3. The wrong-key sweep (``benchmarks/sweep.py``, each case in its own process):
   key-image pairs/s of the ``weights`` strategy for N = 10 and 100 keys over
   10,000 test images, of the ``images`` strategy and of a Python loop of
   per-key jitted calls, against single-key inference images/s; peak memory
   of each case.

Appends a dated Markdown section to ``--out`` (created with a title if missing)
and optionally writes the numbers as JSON. Progress goes to stderr.

torch is imported here only: it is a benchmark dependency, never a runtime
dependency of the library. Where it is not installed (a GPU machine with JAX
only), the JAX rows are measured without the PyTorch ratios.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Measure this checkout, whether or not the package is installed.
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(HERE))

# The library's XLA:CPU flag (convmixer_jax/_xla_flags.py) is applied before JAX starts its
# backend, exactly as the command line applies it for a user.
_XLA_FLAGS_BEFORE = os.environ.get("XLA_FLAGS")
import convmixer_jax  # noqa: E402

convmixer_jax.apply_cpu_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from machine import cores, cpu_flags, cpu_model, loadavg, ram_gib, version  # noqa: E402

from convmixer_jax.model.convmixer import (  # noqa: E402
    PRESETS,
    ConvMixer,
    prepare_inference,
    resolve_depthwise_impl,
)
from convmixer_jax.scheme import images as blockwise  # noqa: E402
from convmixer_jax.scheme.keys import generate_key, random_keys  # noqa: E402
from convmixer_jax.training.loop import (  # noqa: E402
    RECIPES,
    init_variables,
    initial_state,
    make_optimizer,
    make_step,
)

BATCH = 128
LOGIT_TOL = 1e-3
TITLE = "# convmixer-jax benchmark results"
INTRO = (
    "Each section below was appended by `python benchmarks/bench.py` (see benchmarks/README.md) "
    "and records one run on one machine: the machine, the library versions and the exact command "
    "are in its header. Model rows compare the library's jitted JAX/Flax ConvMixer-256/8 "
    "(training step and inference, batch 128, float32) with PyTorch eager (channels_last) "
    "measured in the same process, with JAX and PyTorch rounds interleaved; both frameworks are "
    "first checked to compute the same logits from the same parameters. Block-wise rows give "
    "the bandwidth of the image transform (bytes read + bytes written per second) against a plain "
    "memory copy. Timings on shared or busy machines are noisy (often 5-15 %): compare ratios "
    "measured within one section rather than absolute numbers across sections, and do not quote "
    "sections marked *quick* (smoke runs with very few steps).\n"
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs):
    return float(statistics.median(xs))


# --------------------------------------------------------------------------- machine


def machine_info(torch) -> dict:
    flags = cpu_flags()
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    devs = jax.devices()
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cores": cores(),
        "ram_gib": ram_gib(),
        "avx512": bool(avx512),
        "avx512_flags": avx512,
        "avx2": "avx2" in flags,
        "jax_backend": jax.default_backend(),
        "jax_devices": [f"{d.platform}:{getattr(d, 'device_kind', str(d))}" for d in devs],
        "versions": {
            "python": platform.python_version(),
            "jax": version("jax"),
            "jaxlib": version("jaxlib"),
            "flax": version("flax"),
            "optax": version("optax"),
            "numpy": np.__version__,
            "torch": torch.__version__ if torch else "not installed",
        },
        "torch_num_threads": torch.get_num_threads() if torch else None,
        "torch_device": ("cuda" if torch.cuda.is_available() else "cpu") if torch else "none",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_flags_before_import": _XLA_FLAGS_BEFORE,
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable] + sys.argv)),
        "loadavg_start": loadavg(),
    }
    if torch and torch.cuda.is_available():
        info["torch_cuda_device"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------- torch model


def copy_params_to_torch(variables, tmodel, torch, depth: int) -> None:
    """Load JAX/Flax ConvMixer variables into ``torch_reference.torch_convmixer``.

    stem kernel (P,P,C,d)->(d,C,P,P); depthwise (k,k,1,d)->(d,1,k,k);
    pointwise (1,1,d,d)->(d,d,1,1); head (d,classes)->(classes,d); BN scale/bias/mean/var.
    """
    params, stats = variables["params"], variables["batch_stats"]

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32)))

    def conv(mod, p):
        mod.weight.copy_(t(np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1))))
        mod.bias.copy_(t(p["bias"]))

    def bn(mod, p, s):
        mod.weight.copy_(t(p["scale"]))
        mod.bias.copy_(t(p["bias"]))
        mod.running_mean.copy_(t(s["mean"]))
        mod.running_var.copy_(t(s["var"]))
        assert abs(mod.eps - 1e-5) < 1e-12

    layers = list(tmodel)
    with torch.no_grad():
        conv(layers[0], params["stem"])
        bn(layers[2], params["stem_bn"], stats["stem_bn"])
        for i in range(depth):
            blk_p, blk_s = params[f"block_{i}"], stats[f"block_{i}"]
            res = layers[3 + 4 * i].fn
            conv(res[0], blk_p["depthwise"])
            bn(res[2], blk_p["depthwise_bn"], blk_s["depthwise_bn"])
            conv(layers[4 + 4 * i], blk_p["pointwise"])
            bn(layers[6 + 4 * i], blk_p["pointwise_bn"], blk_s["pointwise_bn"])
        head = layers[3 + 4 * depth + 2]
        head.weight.copy_(t(np.asarray(params["head"]["kernel"]).T))
        head.bias.copy_(t(params["head"]["bias"]))


def perturb_bn(variables, seed: int = 1):
    """Random BN scale/bias and running statistics, so the logit check exercises them."""
    rng = np.random.default_rng(seed)

    def walk(p, s):
        for name in p:
            if name.endswith("bn"):
                c = np.asarray(p[name]["scale"]).shape[0]
                p[name]["scale"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
                p[name]["bias"] = rng.normal(0.0, 0.1, c).astype(np.float32)
                s[name]["mean"] = rng.normal(0.0, 0.1, c).astype(np.float32)
                s[name]["var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            elif isinstance(p[name], dict) and name in s:
                walk(p[name], s[name])

    out = jax.tree.map(lambda a: np.array(a, copy=True), variables)
    out = {"params": _to_dict(out["params"]), "batch_stats": _to_dict(out["batch_stats"])}
    walk(out["params"], out["batch_stats"])
    return out


def _to_dict(tree):
    if hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


# --------------------------------------------------------------------------- model benchmark


class Timer:
    """Per-step times of one benchmark, grouped in rounds."""

    def __init__(self, name: str):
        self.name = name
        self.rounds: list[list[float]] = []
        self.first_call_s: float | None = None

    def round_medians(self):
        return [median(r) for r in self.rounds]

    def step_s(self) -> float:
        return median(self.round_medians())

    def summary(self, batch: int) -> dict:
        rm = self.round_medians()
        s = median(rm)
        return {
            "median_step_s": s,
            "images_per_s": batch / s,
            "round_median_step_s": rm,
            "round_images_per_s": [batch / r for r in rm],
            "steps_per_round": [len(r) for r in self.rounds],
            "first_call_s": self.first_call_s,
            "all_step_s": self.rounds,
        }


def run_round(timer: Timer, fn, steps: int, warmup: int) -> None:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    timer.rounds.append(times)


def model_flops_per_image(config) -> float:
    """Forward FLOPs per image by the conventional count (2 x multiply-adds of the
    patch embedding, the k x k depthwise and 1x1 convolutions and the head; the
    dense Toeplitz form does extra arithmetic that is not counted)."""
    g = config.grid_size**2
    pb = config.patch_size**2 * config.channels
    d = config.dim
    per_block = g * d * config.kernel_size**2 + g * d * d
    return 2.0 * (g * pb * d + config.depth * per_block + d * config.num_classes)


# Published dense peaks (TFLOP/s): FP32 on the CUDA cores and TF32 on the tensor
# cores, which XLA uses for float32 matrix products at its default precision.
GPU_PEAK_TFLOPS = {
    "H100": {"fp32": 67.0, "tf32": 494.7},  # H100 SXM5 datasheet
    "H200": {"fp32": 67.0, "tf32": 494.7},  # same GH100 compute as H100 SXM5
    "A100": {"fp32": 19.5, "tf32": 156.0},
}


def gpu_peak(device_kind: str) -> dict | None:
    for name, peak in GPU_PEAK_TFLOPS.items():
        if name in device_kind.upper():
            return {"name": name, **peak}
    return None


def _same_function_check(torch, t_eval, tx_f32, mean, std, j_logits) -> dict:
    """PyTorch eval logits on the same batch must equal the JAX ones (to LOGIT_TOL)."""
    log("checking that JAX and PyTorch compute the same eval logits ...")
    with torch.inference_mode():
        t_logits = t_eval((tx_f32 - mean) / std).float().cpu().numpy()
    max_diff = float(np.max(np.abs(j_logits - t_logits)))
    log(
        f"  max |logits_jax - logits_torch| = {max_diff:.2e} (tolerance {LOGIT_TOL:g}; "
        f"logit scale {float(np.max(np.abs(j_logits))):.2f})"
    )
    if not max_diff <= LOGIT_TOL:
        raise SystemExit(
            f"JAX and PyTorch eval logits differ by {max_diff:.3e} > {LOGIT_TOL}: "
            "the comparison would not be apples to apples"
        )
    return {
        "max_abs_logit_diff": max_diff,
        "tolerance": LOGIT_TOL,
        "max_abs_logit": float(np.max(np.abs(j_logits))),
        "max_rel_logit_diff": max_diff / max(float(np.max(np.abs(j_logits))), 1e-30),
    }


def model_benchmarks(args, torch, info: dict) -> dict:
    if torch is not None:
        import torch_reference

    config = PRESETS["paper"]
    if args.tiny:  # a smoke run's model: the same code paths, a fraction of the work
        import dataclasses

        config = dataclasses.replace(config, dim=16, depth=1)
    BATCH = args.batch
    recipe = RECIPES["paper"]
    assert recipe.optimizer == "adam" and recipe.lr == 1e-3 and not recipe.augment
    grid = (config.grid_size, config.grid_size)
    impl = resolve_depthwise_impl(config.depthwise_impl, grid)
    alt_impl = "conv" if impl != "conv" else "toeplitz"
    has_torch = torch is not None
    compiled = False
    tdev = torch.device(info["torch_device"]) if has_torch else None
    cl = torch.channels_last if has_torch else None

    def tsync():
        if tdev.type == "cuda":
            torch.cuda.synchronize()

    log(
        f"model: ConvMixer-{config.dim}/{config.depth} k={config.kernel_size} "
        f"p={config.patch_size}, "
        f"depthwise_impl={config.depthwise_impl!r} -> {impl!r}; batch {BATCH}"
    )

    variables = perturb_bn(init_variables(config, seed=0))
    rng = np.random.default_rng(0)
    images_u8 = rng.integers(
        0, 256, (BATCH, config.image_size, config.image_size, config.channels), dtype=np.uint8
    )
    labels = rng.integers(0, config.num_classes, BATCH).astype(np.int32)
    images_f32 = rng.random(
        (BATCH, config.image_size, config.image_size, config.channels), dtype=np.float32
    )

    # ---- torch models (one for training, one for eval), same parameters as JAX
    def new_torch_model():
        m = torch_reference.torch_convmixer(
            config.dim,
            config.depth,
            config.kernel_size,
            config.patch_size,
            config.num_classes,
            config.channels,
        )
        copy_params_to_torch(variables, m, torch, config.depth)
        return m.to(tdev).to(memory_format=cl)

    if has_torch:
        t_eval = new_torch_model().eval()
        t_train = new_torch_model().train()
        compiled = args.torch_compile
        if compiled:  # the same models, compiled by TorchInductor (first call compiles)
            tc_eval = torch.compile(new_torch_model().eval())
            tc_train = torch.compile(new_torch_model().train())
        mean = torch.tensor(config.norm_mean, dtype=torch.float32, device=tdev).view(1, -1, 1, 1)
        std = torch.tensor(config.norm_std, dtype=torch.float32, device=tdev).view(1, -1, 1, 1)

        # NHWC memory viewed as NCHW is exactly the channels_last layout.
        tx_f32 = torch.from_numpy(images_f32).to(tdev).permute(0, 3, 1, 2)
        tx_u8 = torch.from_numpy(images_u8).to(tdev).permute(0, 3, 1, 2)
        ty = torch.from_numpy(labels.astype(np.int64)).to(tdev)
        assert tx_f32.is_contiguous(memory_format=cl) and tx_u8.is_contiguous(memory_format=cl)

    # ---- JAX inference
    model = ConvMixer(config)
    infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
    jvars = jax.device_put(variables)
    jx_f32 = jax.device_put(images_f32)
    # As predict / evaluate / attack run it: the depthwise matrices built once
    # per set of weights (prepare_inference), not in every call.
    t0 = time.perf_counter()
    pvars = jax.block_until_ready(prepare_inference(config, jvars))
    prepare_first = time.perf_counter() - t0
    prepare_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(prepare_inference(config, jvars))
        prepare_times.append(time.perf_counter() - t0)

    # ---- equality check: same function in both frameworks
    t0 = time.perf_counter()
    j_logits = np.asarray(jax.block_until_ready(infer(pvars, jx_f32)))
    infer_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    j_logits_plain = np.asarray(jax.block_until_ready(infer(jvars, jx_f32)))
    infer_plain_first = time.perf_counter() - t0
    prepared_diff = float(np.max(np.abs(j_logits - j_logits_plain)))
    assert prepared_diff < LOGIT_TOL, f"prepared inference differs from plain by {prepared_diff}"
    check = None
    if has_torch:
        check = _same_function_check(torch, t_eval, tx_f32, mean, std, j_logits)

    # ---- JAX training step: the library's step, shardings as train.train builds them
    devices = jax.devices()[:1]
    mesh = Mesh(np.asarray(devices), ("data",))
    data_sh = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())
    steps_per_epoch = 50_000 // recipe.batch_size
    tx = make_optimizer(recipe, steps_per_epoch)
    step_fn = make_step(config, recipe, tx, data_sh, repl)
    state = jax.device_put(initial_state(recipe, tx, variables), repl)
    jxb = jax.device_put(images_u8, data_sh)
    jyb = jax.device_put(labels, data_sh)
    jax_state = {"state": state}

    def jax_train():
        st, loss, correct = step_fn(jax_state["state"], jxb, jyb)
        jax.block_until_ready((st, loss, correct))
        jax_state["state"] = st

    if has_torch:
        opt = torch.optim.Adam(t_train.parameters(), lr=recipe.lr)
        ce = torch.nn.functional.cross_entropy

    def torch_train():
        x = tx_u8.float().div_(255.0)  # preserves channels_last strides
        out = t_train((x - mean) / std)
        loss = ce(out, ty)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tsync()

    if compiled:
        opt_c = torch.optim.Adam(tc_train.parameters(), lr=recipe.lr)

    def torch_compile_train():
        x = tx_u8.float().div_(255.0)
        loss = ce(tc_train((x - mean) / std), ty)
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()
        tsync()

    def torch_compile_infer():
        with torch.inference_mode():
            tc_eval((tx_f32 - mean) / std)
        tsync()

    def jax_infer():
        jax.block_until_ready(infer(pvars, jx_f32))

    def jax_infer_plain():
        jax.block_until_ready(infer(jvars, jx_f32))

    def torch_infer():
        with torch.inference_mode():
            t_eval((tx_f32 - mean) / std)
        tsync()

    names = (
        ("jax_train", "torch_train", "jax_infer", "torch_infer", "jax_infer_plain")
        if has_torch
        else ("jax_train", "jax_infer", "jax_infer_plain")
    )
    if compiled:
        names += ("torch_compile_train", "torch_compile_infer")
    timers = {k: Timer(k) for k in names}
    timers["jax_infer"].first_call_s = infer_first
    timers["jax_infer_plain"].first_call_s = infer_plain_first

    log("compiling the JAX train step ...")
    t0 = time.perf_counter()
    jax_train()
    timers["jax_train"].first_call_s = time.perf_counter() - t0
    if has_torch:
        t0 = time.perf_counter()
        torch_train()
        timers["torch_train"].first_call_s = time.perf_counter() - t0
        log(
            f"  first step: JAX {timers['jax_train'].first_call_s:.1f} s (compile + run), "
            f"torch {timers['torch_train'].first_call_s:.2f} s"
        )
    if compiled:
        for name, fn in (
            ("torch_compile_train", torch_compile_train),
            ("torch_compile_infer", torch_compile_infer),
        ):
            t0 = time.perf_counter()
            fn()
            timers[name].first_call_s = time.perf_counter() - t0
            log(
                f"  first call of {name}: {timers[name].first_call_s:.1f} s (TorchInductor compile "
                "+ run)"
            )
        with torch.inference_mode():
            c_logits = tc_eval((tx_f32 - mean) / std).float().cpu().numpy()
        c_diff = float(np.max(np.abs(c_logits - j_logits)))
        log(f"  max |logits_jax - logits_torch.compile| = {c_diff:.2e}")
        if not c_diff <= LOGIT_TOL:
            raise SystemExit(
                f"JAX and torch.compile eval logits differ by {c_diff:.3e} > {LOGIT_TOL}"
            )

    log(f"warm-up: {_n(args.warmup, 'step')} each ...")
    for _ in range(args.warmup):
        jax_train()
        if has_torch:
            torch_train()
    for _ in range(args.warmup):
        jax_infer()
        jax_infer_plain()
        if has_torch:
            torch_infer()
        if compiled:
            torch_compile_train()
            torch_compile_infer()

    # Interleaved rounds; the order flips every round (J T, T J, ...) so that a
    # slow drift of the machine does not favour one framework.
    for phase, steps, pair in (
        ("training", args.train_steps, ("jax_train", "torch_train", "torch_compile_train")),
        (
            "inference",
            args.infer_steps,
            ("jax_infer", "torch_infer", "jax_infer_plain", "torch_compile_infer"),
        ),
    ):
        fns = {"jax_train": jax_train, "jax_infer": jax_infer, "jax_infer_plain": jax_infer_plain}
        if has_torch:
            fns.update(torch_train=torch_train, torch_infer=torch_infer)
        if compiled:
            fns.update(
                torch_compile_train=torch_compile_train, torch_compile_infer=torch_compile_infer
            )
        pair = tuple(n for n in pair if n in fns)
        for r in range(args.rounds):
            order = pair if r % 2 == 0 else pair[::-1]
            for name in order:
                run_round(timers[name], fns[name], steps, warmup=1)
            label = {
                "jax_train": "JAX",
                "jax_infer": "JAX",
                "jax_infer_plain": "JAX (unprepared)",
                "torch_train": "torch",
                "torch_infer": "torch",
                "torch_compile_train": "torch.compile",
                "torch_compile_infer": "torch.compile",
            }
            msg = ", ".join(
                f"{label[n]} {BATCH / median(timers[n].rounds[-1]):.0f} img/s" for n in pair
            )
            log(f"{phase} round {r + 1}/{args.rounds}: {msg}")

    results = {name: tm.summary(BATCH) for name, tm in timers.items()}

    # ---- the other depthwise formulation, inference only, few steps
    alt = None
    if not args.skip_alt:
        import dataclasses

        log(f"inference with depthwise_impl={alt_impl!r} ({args.alt_steps} steps) ...")
        alt_cfg = dataclasses.replace(config, depthwise_impl=alt_impl)
        alt_model = ConvMixer(alt_cfg)
        alt_infer = jax.jit(lambda v, x: alt_model.apply(v, x, train=False))
        t0 = time.perf_counter()
        alt_logits = np.asarray(jax.block_until_ready(alt_infer(jvars, jx_f32)))
        first = time.perf_counter() - t0
        tm = Timer("jax_infer_alt")
        tm.first_call_s = first
        run_round(
            tm, lambda: jax.block_until_ready(alt_infer(jvars, jx_f32)), args.alt_steps, warmup=0
        )
        alt = tm.summary(BATCH)
        alt["depthwise_impl"] = alt_impl
        alt["max_abs_logit_diff_vs_default"] = float(np.max(np.abs(alt_logits - j_logits)))
        log(
            f"  {alt_impl}: {alt['images_per_s']:.1f} img/s "
            f"(logits differ from {impl!r} by {alt['max_abs_logit_diff_vs_default']:.1e})"
        )

    return {
        "config": config.to_dict(),
        "recipe": recipe.to_dict(),
        "batch": BATCH,
        "depthwise_impl": impl,
        "depthwise_impl_requested": config.depthwise_impl,
        "rounds": args.rounds,
        "train_steps_per_round": args.train_steps,
        "infer_steps_per_round": args.infer_steps,
        "warmup": args.warmup,
        "check": check,
        "results": results,
        "alt": alt,
        "flops_per_image_forward": model_flops_per_image(config),
        "train_ratio": (
            results["jax_train"]["images_per_s"] / results["torch_train"]["images_per_s"]
            if has_torch
            else None
        ),
        "infer_ratio": (
            results["jax_infer"]["images_per_s"] / results["torch_infer"]["images_per_s"]
            if has_torch
            else None
        ),
        "infer_plain_ratio": (
            results["jax_infer_plain"]["images_per_s"] / results["torch_infer"]["images_per_s"]
            if has_torch
            else None
        ),
        "train_ratio_compile": (
            results["jax_train"]["images_per_s"] / results["torch_compile_train"]["images_per_s"]
            if compiled
            else None
        ),
        "infer_ratio_compile": (
            results["jax_infer"]["images_per_s"] / results["torch_compile_infer"]["images_per_s"]
            if compiled
            else None
        ),
        "tiny": bool(args.tiny),
        "prepare": {
            "first_call_s": prepare_first,
            "median_s": median(prepare_times),
            "max_abs_logit_diff": prepared_diff,
        },
    }


# --------------------------------------------------------------------------- block-wise transform


def blockwise_benchmarks(args) -> dict:
    m, c, hw = 4, 3, 32
    n_big, n_small, n_keys = args.bw_images, args.bw_images // 10, 8
    key = generate_key(m, c, seed=0)
    keys = random_keys(jax.random.PRNGKey(0), n_keys, m, c)
    enc = jax.jit(blockwise.encrypt_images)
    enc_many = jax.jit(jax.vmap(blockwise.encrypt_images, in_axes=(None, 0)))
    add0 = jax.jit(lambda x: x + 0)
    jcopy = jax.jit(jnp.copy)
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (n_big, hw, hw, c), dtype=np.uint8)
    data = {"uint8": u8, "float32": u8.astype(np.float32) / np.float32(255.0)}

    cases = []  # (name, dtype, images, bytes moved, fn)
    checks = {}
    for dname, host in data.items():
        dev = jax.device_put(host)
        dev_small = jax.device_put(host[:n_small])
        dst = np.empty_like(host)
        jax.block_until_ready((dev, dev_small))
        nbytes = host.nbytes
        small_bytes = host[:n_small].nbytes
        # correctness, once: library vs the plain NumPy transcription; vmap vs single keys
        ref = blockwise.encrypt_images_reference(host[:16], key)
        ok_single = bool(np.array_equal(np.asarray(enc(dev, key))[:16], ref))
        many = np.asarray(enc_many(dev_small, keys))
        ok_vmap = all(
            np.array_equal(many[i], np.asarray(enc(dev_small, keys[i]))) for i in (0, n_keys - 1)
        )
        checks[dname] = {"encrypt_matches_reference": ok_single, "vmap_matches_single": ok_vmap}
        if not (ok_single and ok_vmap):
            raise SystemExit(f"block-wise transform check failed for {dname}: {checks[dname]}")

        cases += [
            (
                "np.copyto (memory copy)",
                dname,
                n_big,
                2 * nbytes,
                lambda h=host, d=dst: np.copyto(d, h),
            ),
            (
                "jax.jit(x + 0) (memory copy)",
                dname,
                n_big,
                2 * nbytes,
                lambda d=dev: jax.block_until_ready(add0(d)),
            ),
            (
                "jax.jit(jnp.copy) (memory copy)",
                dname,
                n_big,
                2 * nbytes,
                lambda d=dev: jax.block_until_ready(jcopy(d)),
            ),
            (
                "encrypt_images, jitted",
                dname,
                n_big,
                2 * nbytes,
                lambda d=dev: jax.block_until_ready(enc(d, key)),
            ),
            (
                f"vmap(encrypt_images), {n_keys} keys",
                dname,
                n_small,
                small_bytes * (1 + n_keys),
                lambda d=dev_small: jax.block_until_ready(enc_many(d, keys)),
            ),
        ]
    log(
        f"block-wise transform: {len(cases)} cases, {args.bw_rounds} rounds x {args.bw_reps} reps "
        "..."
    )
    for *_, fn in cases:  # compile + warm up
        for _ in range(args.bw_warmup):
            fn()
    times = {i: [] for i in range(len(cases))}
    for r in range(args.bw_rounds):
        order = range(len(cases)) if r % 2 == 0 else reversed(range(len(cases)))
        for i in order:
            fn = cases[i][-1]
            for _ in range(args.bw_reps):
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
        log(f"  block-wise round {r + 1}/{args.bw_rounds} done")

    rows = []
    for i, (name, dname, n, moved, _) in enumerate(cases):
        s = median(times[i])
        rows.append(
            {
                "name": name,
                "dtype": dname,
                "images": n,
                "bytes_moved": moved,
                "median_s": s,
                "gb_per_s": moved / s / 1e9,
                "samples": len(times[i]),
            }
        )
    for row in rows:
        base_np = next(
            r for r in rows if r["dtype"] == row["dtype"] and r["name"].startswith("np.copyto")
        )
        base_jx = next(
            r for r in rows if r["dtype"] == row["dtype"] and r["name"].startswith("jax.jit(x + 0)")
        )
        row["vs_np_copy"] = row["gb_per_s"] / base_np["gb_per_s"]
        row["vs_jax_copy"] = row["gb_per_s"] / base_jx["gb_per_s"]
    return {
        "block_size": m,
        "image_shape": [hw, hw, c],
        "images": n_big,
        "vmap_images": n_small,
        "vmap_keys": n_keys,
        "checks": checks,
        "rows": rows,
    }


# --------------------------------------------------------------------------- report


def markdown(
    info: dict, mres: dict | None, bres: dict | None, quick: bool, sres: dict | None = None
) -> str:
    L = []
    tag = " (quick smoke run: do not quote)" if quick or (mres or {}).get("tiny") else ""
    dev = info["jax_devices"][0] if info["jax_backend"] != "cpu" else "CPU"
    L.append(
        f"## {info['date_utc']}: {info['cpu_model']}, {info['cores']} cores, JAX on {dev}{tag}\n"
    )
    v = info["versions"]
    ram = f"{info['ram_gib']:.1f} GiB" if info["ram_gib"] else "unknown"
    avx = ("yes (" + ", ".join(info["avx512_flags"]) + ")") if info["avx512"] else "no"
    L.append(
        f"- Machine: {info['cpu_model']}, {info['cores']} cores, {ram} RAM, avx512: {avx}, "
        f"avx2: {'yes' if info['avx2'] else 'no'}; host `{info['hostname']}`"
    )
    L.append(
        f"- JAX backend: {info['jax_backend']}, devices: {', '.join(info['jax_devices'])}; "
        f"PyTorch device: {info['torch_device']}"
        + (f" ({info['torch_cuda_device']})" if info.get("torch_cuda_device") else "")
    )
    L.append(
        f"- Versions: python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax "
        f"{v['flax']}, "
        f"optax {v['optax']}, numpy {v['numpy']}, torch {v['torch']}"
    )
    if info["torch_num_threads"] is not None:
        L.append(f"- torch.get_num_threads(): {info['torch_num_threads']}")
    L.append(
        f"- XLA_FLAGS in effect: `{info['xla_flags'] or '(none)'}`"
        + (
            ""
            if info["xla_flags_before_import"] == info["xla_flags"]
            else " (before `convmixer_jax.apply_cpu_flags()`: "
            f"`{info['xla_flags_before_import'] or '(unset)'}`)"
        )
    )
    L.append(
        f"- Load average (1/5/15 min) at start: {info['loadavg_start']}, at end: "
        f"{info.get('loadavg_end', 'n/a')}"
    )
    L.append(f"- Wall time: {info.get('wall_s', 0):.0f} s")
    L.append(f"- Command: `{info['command']}`")
    L.append("")
    if mres:
        c = mres["config"]
        r = mres["results"]
        L.append(
            f"### ConvMixer-{c['dim']}/{c['depth']} (k={c['kernel_size']}, p={c['patch_size']}, "
            f"{c['image_size']}x{c['image_size']}x{c['channels']}, {c['num_classes']} classes), "
            f"batch {mres['batch']}, float32\n"
        )
        ck = mres["check"]
        L.append(
            f"JAX depthwise formulation: `depthwise_impl={mres['depthwise_impl_requested']!r}` -> "
            f"**{mres['depthwise_impl']}**. "
            + (
                f"Same-function check: the JAX parameters (with random "
                "BatchNorm statistics) copied into the PyTorch model give eval logits that differ "
                "by at "
                f"most **{ck['max_abs_logit_diff']:.1e}** (tolerance {ck['tolerance']:g}; "
                f"largest logit {ck['max_abs_logit']:.3g}, relative difference "
                f"{ck['max_rel_logit_diff']:.1e}).\n"
                if ck
                else "PyTorch is not installed here: JAX rows only, no ratios.\n"
            )
        )
        L.append(
            f"{mres['rounds']} interleaved rounds per framework ({mres['train_steps_per_round']} "
            "training / "
            f"{mres['infer_steps_per_round']} inference steps each, after "
            f"{_n(mres['warmup'], 'warm-up step')} "
            "and one more per round, the order of the cases reversed every round); images/s from "
            "the median "
            "over rounds of the per-step median time.\n"
        )
        L.append(
            "| task | JAX img/s | PyTorch img/s | JAX / PyTorch | JAX ms/step | PyTorch ms/step | "
            "JAX img/s per round | PyTorch img/s per round |"
        )
        L.append("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
        for task, j, t, ratio, _desc in (
            ("training step", "jax_train", "torch_train", mres["train_ratio"], "train step"),
            ("inference", "jax_infer", "torch_infer", mres["infer_ratio"], "inference"),
            (
                "inference, matrices rebuilt every call",
                "jax_infer_plain",
                "torch_infer",
                mres.get("infer_plain_ratio"),
                "inference",
            ),
            (
                "training step vs torch.compile",
                "jax_train",
                "torch_compile_train",
                mres.get("train_ratio_compile"),
                "train step",
            ),
            (
                "inference vs torch.compile",
                "jax_infer",
                "torch_compile_infer",
                mres.get("infer_ratio_compile"),
                "inference",
            ),
        ):
            if j not in r or (
                t.startswith("torch_compile") and t not in r
            ):  # rows this run did not measure
                continue
            rj, rt = r[j], r.get(t)
            if rt is None:
                L.append(
                    f"| {task} | {rj['images_per_s']:.1f} | n/a | n/a | "
                    f"{1e3 * rj['median_step_s']:.1f} | n/a | "
                    f"{', '.join(f'{x:.0f}' for x in rj['round_images_per_s'])} | n/a |"
                )
                continue
            L.append(
                f"| {task} | {rj['images_per_s']:.1f} | {rt['images_per_s']:.1f} | {ratio:.2f} | "
                f"{1e3 * rj['median_step_s']:.1f} | {1e3 * rt['median_step_s']:.1f} | "
                f"{', '.join(f'{x:.0f}' for x in rj['round_images_per_s'])} | "
                f"{', '.join(f'{x:.0f}' for x in rt['round_images_per_s'])} |"
            )
        L.append("")
        L.append(
            "- JAX training step: `convmixer_jax.training.loop.make_step` with `RECIPES['paper']` "
            "(Adam, lr 1e-3, "
            "no augmentation), uint8 batch in, single-device mesh shardings, state donated; "
            f"first call (compile + run) {r['jax_train']['first_call_s']:.1f} s."
        )
        if mres["check"]:
            L.append(
                "- PyTorch training step: eager, channels_last, uint8 batch -> float/255 -> "
                "(x-0.5)/0.5, "
                "forward, cross-entropy, backward, `torch.optim.Adam(lr=1e-3)` step."
            )
        L.append(
            "- Inference: jitted `ConvMixer.apply(train=False)` vs PyTorch `eval()` under "
            f"`torch.inference_mode()`, channels_last, float input in [0, 1]; JAX first call "
            f"{r['jax_infer']['first_call_s']:.1f} s."
        )
        prep = mres.get("prepare")
        if prep:
            L.append(
                "- The JAX `inference` row runs on `prepare_inference(config, variables)`, as "
                "`predict`, "
                "`evaluate` and `attack` do: the dense depthwise matrices are built once per set "
                "of weights "
                f"({1e3 * prep['median_s']:.1f} ms, median of 5; first call with compilation "
                f'{prep["first_call_s"]:.1f} s) instead of inside every call. The row "matrices '
                "rebuilt every "
                'call" is the same jitted apply on the plain variables, timed in the same '
                "interleaved rounds; "
                f"the two give logits that differ by {prep['max_abs_logit_diff']:.1e}."
            )
        fl = mres.get("flops_per_image_forward")
        if fl:
            peak = gpu_peak(info["jax_devices"][0]) if info["jax_backend"] == "gpu" else None
            parts = []
            for task, name, mult in (
                ("training step", "jax_train", 3.0),
                ("inference", "jax_infer", 1.0),
            ):
                achieved = r[name]["images_per_s"] * fl * mult / 1e9
                txt = f"{task} {achieved:.1f} GFLOP/s"
                if peak:
                    txt += (
                        f" ({100 * achieved / 1e3 / peak['fp32']:.1f} % of the {peak['name']}'s "
                        "FP32 peak "
                        f"{peak['fp32']:g} TFLOP/s, {100 * achieved / 1e3 / peak['tf32']:.1f} % of "
                        "its "
                        f"dense TF32 tensor peak {peak['tf32']:g})"
                    )
                parts.append(txt)
            L.append(
                f"- Achieved model FLOP/s (JAX; {fl / 1e6:.1f} MFLOP per image forward by the "
                "conventional "
                "count of 2 x multiply-adds of the convolutions and the head, training step "
                "counted as 3x "
                "forward): " + "; ".join(parts) + "."
            )
        alt = mres.get("alt")
        if alt:
            L.append(
                "- Other depthwise formulation, inference only "
                f"({_n(alt['steps_per_round'][0], 'step')}): "
                f"`depthwise_impl='{alt['depthwise_impl']}'` runs at **{alt['images_per_s']:.1f} "
                "img/s** "
                f"({1e3 * alt['median_step_s']:.0f} ms/step, "
                f"{alt['images_per_s'] / r['jax_infer']['images_per_s']:.3f}x the "
                f"'{mres['depthwise_impl']}' default; first call {alt['first_call_s']:.1f} s; "
                "logits agree "
                f"with the default to {alt['max_abs_logit_diff_vs_default']:.1e})."
            )
        L.append("")
    if bres:
        L.append(
            f"### Block-wise image transform, M = {bres['block_size']}, "
            f"{bres['images']:,} x {' x '.join(map(str, bres['image_shape']))}\n"
        )
        L.append(
            "GB/s = (bytes read + bytes written) / median time (10^9 bytes); the vmapped row reads "
            f"{bres['vmap_images']:,} images once and writes {bres['vmap_keys']} encrypted copies. "
            "`np.copyto` writes into a preallocated array; the jitted JAX functions (copies and "
            "transform) also allocate their output on every call, as a user's call does. Outputs "
            "checked against the NumPy reference transcription (16 images) and the vmapped keys "
            "against single keys.\n"
        )
        L.append(
            "| transform | dtype | images | MB moved | median ms | GB/s | vs np.copyto | vs jax "
            "copy (x + 0) |"
        )
        L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in sorted(bres["rows"], key=lambda r: (r["dtype"] != "uint8",)):
            L.append(
                f"| {row['name']} | {row['dtype']} | {row['images']:,} | "
                f"{row['bytes_moved'] / 1e6:.1f} | "
                f"{1e3 * row['median_s']:.2f} | {row['gb_per_s']:.2f} | {row['vs_np_copy']:.2f} | "
                f"{row['vs_jax_copy']:.2f} |"
            )
        L.append("")
    if sres:
        import sweep

        L.append(sweep.markdown(sres))
    return "\n".join(L) + "\n"


def _n(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def append_section(path: Path, section: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or not path.read_text().strip():
        path.write_text(TITLE + "\n\n" + INTRO + "\n")
    text = path.read_text()
    sep = "" if text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    with path.open("a") as f:
        f.write(sep + section)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="few steps: a smoke run, not a measurement")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"), help="Markdown file to append to")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds per framework (3; quick 2)"
    )
    p.add_argument(
        "--train-steps", type=int, default=None, help="timed training steps per round (15; quick 2)"
    )
    p.add_argument(
        "--infer-steps",
        type=int,
        default=None,
        help="timed inference steps per round (25; quick 3)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps before timing (3; quick 1)"
    )
    p.add_argument(
        "--alt-steps",
        type=int,
        default=None,
        help="timed steps of the other depthwise formulation (3; quick 1)",
    )
    p.add_argument("--skip-alt", action="store_true", help="skip the other depthwise formulation")
    p.add_argument(
        "--torch-compile",
        action="store_true",
        help="also time the PyTorch models under torch.compile (TorchInductor; compiles on "
        "first call)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="smoke runs only: ConvMixer-16/1 at batch 8 instead of ConvMixer-256/8 at batch 128",
    )
    p.add_argument("--batch", type=int, default=None, help="model batch (128; tiny 8)")
    p.add_argument("--skip-model", action="store_true", help="skip the model benchmarks")
    p.add_argument(
        "--skip-blockwise", action="store_true", help="skip the block-wise transform benchmarks"
    )
    p.add_argument(
        "--torch-threads", type=int, default=None, help="torch intra-op threads (default: cores)"
    )
    p.add_argument("--skip-sweep", action="store_true", help="skip the wrong-key sweep")
    p.add_argument(
        "--sweep-images", type=int, default=None, help="test images of the sweep (10000; quick 200)"
    )
    p.add_argument(
        "--sweep-keys",
        default=None,
        help="comma-separated N for the weights strategy (10,100; quick 2)",
    )
    p.add_argument(
        "--sweep-images-keys",
        default=None,
        help="comma-separated N for the images strategy (10; quick 2)",
    )
    p.add_argument(
        "--sweep-loop-keys", type=int, default=None, help="keys of the Python loop (4; quick 1)"
    )
    p.add_argument("--key-chunk", type=int, default=4, help="keys per sweep call (default 4)")
    p.add_argument(
        "--sweep-batch-size", type=int, default=125, help="images per sweep call (default 125)"
    )
    p.add_argument(
        "--model",
        default=str(ROOT / "results/cifar10/plain-model"),
        help="model directory for the sweep (a random paper model if missing)",
    )
    p.add_argument(
        "--data-dir",
        default=str(ROOT.parent / "shared/data/cifar10-jpeg"),
        help="CIFAR-10 for the sweep (random images if missing)",
    )
    args = p.parse_args(argv)
    q = args.quick
    defaults = dict(
        rounds=(2, 3),
        train_steps=(2, 15),
        infer_steps=(3, 25),
        warmup=(1, 3),
        alt_steps=(1, 3),
        sweep_images=(200, 10_000),
        sweep_keys=("2", "10,100"),
        sweep_images_keys=("2", "10"),
        sweep_loop_keys=(1, 4),
    )
    for name, (quick_v, full_v) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_v if q else full_v)
    if args.batch is None:
        args.batch = 8 if args.tiny else BATCH
    args.bw_images = 10_000
    args.bw_rounds = 2 if q else 3
    args.bw_reps = 3 if q else 10
    args.bw_warmup = 1 if q else 2
    for name in ("rounds", "train_steps", "infer_steps", "alt_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    try:
        import torch  # benchmarks only
    except ImportError:  # e.g. a GPU machine with JAX only: JAX rows without the PyTorch ratios
        torch = None
        log("PyTorch is not installed: measuring JAX only (no PyTorch ratios)")
    if torch is not None:
        torch.set_num_threads(args.torch_threads or cores())
    info = machine_info(torch)
    log(
        f"{info['cpu_model']}, {info['cores']} cores, avx512={info['avx512']}, JAX backend "
        f"{info['jax_backend']}, torch threads {info['torch_num_threads']}, "
        f"XLA_FLAGS={info['xla_flags']!r}"
    )
    mres = None if args.skip_model else model_benchmarks(args, torch, info)
    bres = None if args.skip_blockwise else blockwise_benchmarks(args)
    sres = None
    if not args.skip_sweep:
        import sweep

        ints = lambda s: tuple(int(v) for v in s.split(",") if v.strip())  # noqa: E731
        settings = {
            "images": args.sweep_images,
            "key_chunk": args.key_chunk,
            "batch_size": args.sweep_batch_size,
            "model": args.model,
            "data_dir": args.data_dir,
        }
        sres = sweep.run_sweep(
            settings,
            ints(args.sweep_keys),
            ints(args.sweep_images_keys),
            args.sweep_loop_keys,
            log=log,
        )
    info["loadavg_end"] = loadavg()
    info["wall_s"] = time.perf_counter() - t_start
    section = markdown(info, mres, bres, args.quick, sres)
    out = Path(args.out)
    append_section(out, section)
    log(f"appended a section to {out}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": info,
                    "quick": args.quick,
                    "model": mres,
                    "blockwise": bres,
                    "sweep": sres,
                },
                indent=1,
            )
        )
        log(f"wrote {args.json}")
    sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
