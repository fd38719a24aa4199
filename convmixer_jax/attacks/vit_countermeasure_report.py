"""The security report's countermeasure section on an encrypted ViT: a fresh key with block
scrambling per client, and the model rekeyed for each.

The provider recovers a key with block scrambling from the encrypted ViT and one query
(:func:`~convmixer_jax.attacks.block_key.recover_scrambled_key_from_model`). The fix a
reader proposes next: give every client its own key and its own copy of the model,
rekeyed for that key (:func:`~convmixer_jax.scheme.params.rekey_params`, the scheme's key
update, which needs no training), so that a key read off one client's model and queries
says nothing about another's. For ``clients`` clients, on the report's model and data:

- **accuracy**: each client's model on that client's encrypted images, against the plain
  model on the plain images (the same images; identical predictions counted);
- **the leak across clients**: client A's key as the provider recovers it (A's model, one
  of A's queries and the report's unlabeled public images), applied to client B's traffic:
  B's model on B's images encrypted with A's recovered key (B's queries decrypted and
  re-encrypted with A's key), for every ordered pair A != B, and the fraction of B's key
  that A's recovered key shares (pixel positions with B's source and flip, blocks at B's
  places);
- **what it does not stop**: the provider holds every client's model and sees every
  client's queries, so it runs the same recovery on each client: how many keys it gets
  exactly, and each client's model on that client's images encrypted with the key it
  recovered;
- **its cost**: one model copy per client, its bytes, and the bytes that differ between
  copies (the patch embedding and the position embedding; the rest is the same model).

Secret keys are never written, only their fingerprints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from convmixer_jax.attacks.protocol import EVAL_BATCH_SIZE, Attack, AttackContext, option

if TYPE_CHECKING:
    from convmixer_jax.scheme.keys import Key

#: The parameters that differ between the clients' copies of a ViT (the rest is shared).
KEYED_PARAMS = ("patch_embed", "pos_embed")


@dataclass(frozen=True)
class ViTCountermeasureConfig:
    vit_countermeasure_clients: int = option(
        4,
        "clients of the per-client-key countermeasure on a ViT, each with its own key with "
        "block scrambling and its own rekeyed model (0: skip it; at least 2 otherwise; "
        "default {default})",
        metavar="C",
        minimum=0,
    )

    def __post_init__(self):
        if self.vit_countermeasure_clients == 1:
            raise ValueError(
                "--vit-countermeasure-clients is 1, but the leak across clients needs at least "
                "2 clients; pass 2 or more (or 0 to skip the section)"
            )


# ----------------------------------------------------------------------------- the study


def client_models(config, variables, keys: Sequence[Key]) -> list[dict]:
    """One encrypted copy of the plain ``variables`` per key: the first encrypted with
    ``keys[0]``, each other one rekeyed from it (:func:`~convmixer_jax.scheme.params.rekey_params`).
    Leaves are NumPy arrays."""
    import jax
    import numpy as np

    from convmixer_jax.scheme.params import encrypt_params, rekey_params

    norm = dict(mean=config.mean, std=config.std)
    first = encrypt_params(variables, keys[0], **norm)
    models = [first] + [rekey_params(first, keys[0], key, **norm) for key in keys[1:]]
    return [jax.tree.map(np.asarray, m) for m in models]


def tree_bytes(tree) -> int:
    """Bytes of the array leaves of ``tree``."""
    import jax
    import numpy as np

    return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree)))


def per_client_keys(
    config,
    variables,
    eval_data,
    query_images,
    keys: Sequence[Key],
    *,
    queries: int = 1,
    public_images=None,
    seed: int = 0,
    batch_size: int = EVAL_BATCH_SIZE,
    recover: Callable[..., Any] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Measure the per-client-key countermeasure on a ViT (module docstring).

    Args:
      config, variables: the plain ViT.
      eval_data: (images (N, H, W, C) uint8, labels (N,)): every client's images.
      query_images: (M, H, W, C) uint8 from which ``queries`` random images per client are
        encrypted with its key as the query the provider attacks.
      keys: one secret key with block scrambling on the model's grid per client (at least 2).
      public_images: (K, H, W, C) uint8 unlabeled images for the recovery, or None.
      recover: the key recovery, called as ``recover(config, encrypted_variables,
        queries=..., public_images=..., seed=...)`` and returning an object with
        ``best_guess`` (a Key), ``determined`` and ``up_to_mirror``; default
        :func:`~convmixer_jax.attacks.block_key.recover_scrambled_key_from_model`.

    Returns a JSON-serializable dict: ``clients``, ``images``, ``plain_accuracy``,
    per client (``per_client``: key fingerprint, accuracy on its own images, identical
    predictions, the recovery's exactness and claim, accuracy with the recovered key),
    per ordered pair (``pairs``: accuracy of B's model on B's images under A's recovered
    key, identical predictions, pixel positions and blocks shared), their totals, and
    the cost (``model_copies``, ``model_bytes``, ``copies_bytes``, ``keyed_bytes``).
    """
    import numpy as np

    from convmixer_jax.attacks.block_key import (
        blocks_placed_right,
        mirrored_key,
        pixel_positions_right,
        same_scrambling_key,
    )
    from convmixer_jax.model.inference import predict_logits
    from convmixer_jax.scheme.images import encrypt_images_reference
    from convmixer_jax.scheme.keys import fingerprint

    if recover is None:
        from convmixer_jax.attacks.block_key import recover_scrambled_key_from_model as recover

    keys = list(keys)
    if len(keys) < 2:
        raise ValueError(f"the countermeasure needs at least 2 clients, got {len(keys)}")
    x, y = np.asarray(eval_data[0]), np.asarray(eval_data[1])
    query_images = np.asarray(query_images)
    rng = np.random.default_rng(seed)

    def predictions(model_variables, images):
        return np.argmax(predict_logits(config, model_variables, images, batch_size=batch_size), 1)

    plain = predictions(variables, x)
    plain_accuracy = float(np.mean(plain == y))
    models = client_models(config, variables, keys)

    def measured(pred) -> dict:
        return {
            "accuracy": float(np.mean(pred == y)),
            "identical_predictions": int(np.sum(pred == plain)),
        }

    per_client, pairs = [], []
    for a, (key, model) in enumerate(zip(keys, models, strict=True)):
        own = measured(predictions(model, encrypt_images_reference(x, key)))
        idx = rng.choice(len(query_images), min(queries, len(query_images)), replace=False)
        rec = recover(
            config,
            model,
            queries=encrypt_images_reference(query_images[idx], key),
            public_images=public_images,
            seed=seed + a,
        )
        guess = rec.best_guess
        exact = same_scrambling_key(guess, key)
        under_guess = encrypt_images_reference(x, guess)  # every client's images, A's key
        for b, (key_b, model_b) in enumerate(zip(keys, models, strict=True)):
            result = measured(predictions(model_b, under_guess))
            if b == a:
                with_guess = result
                continue
            pairs.append(
                {
                    "from_client": a,
                    "to_client": b,
                    **result,
                    "pixel_positions_shared": pixel_positions_right(guess, key_b),
                    "blocks_shared": blocks_placed_right(guess.block_perm, key_b.block_perm),
                }
            )
        per_client.append(
            {
                "key_fingerprint": fingerprint(key),
                "accuracy": own["accuracy"],
                "identical_predictions": own["identical_predictions"],
                "recovered_exact": exact,
                "recovered_exact_up_to_mirror": exact
                or same_scrambling_key(guess, mirrored_key(key)),
                "recovery_claimed": bool(rec.determined),
                "recovery_claimed_up_to_mirror": bool(rec.up_to_mirror),
                "recovered_key_accuracy": with_guess["accuracy"],
                "recovered_key_identical_predictions": with_guess["identical_predictions"],
            }
        )
        log(
            f"  client {a + 1}/{len(keys)}: accuracy {own['accuracy']:.4f} (identical "
            f"{own['identical_predictions']}/{len(x)}), key recovered exactly: {exact}"
        )

    keyed = {name: variables["params"][name] for name in KEYED_PARAMS}
    model_bytes = tree_bytes(variables)
    return {
        "clients": len(keys),
        "images": len(x),
        "queries": queries,
        "public_images": 0 if public_images is None else len(public_images),
        "grid": list(keys[0].grid),
        "plain_accuracy": plain_accuracy,
        "per_client": per_client,
        "own_accuracy_equals_plain": all(c["accuracy"] == plain_accuracy for c in per_client),
        "identical_predictions": sum(c["identical_predictions"] for c in per_client),
        "recovered_exact": sum(c["recovered_exact"] for c in per_client),
        "recovered_exact_up_to_mirror": sum(c["recovered_exact_up_to_mirror"] for c in per_client),
        "recovery_claimed": sum(c["recovery_claimed"] for c in per_client),
        "recovered_key_accuracy_mean": float(
            np.mean([c["recovered_key_accuracy"] for c in per_client])
        ),
        "pairs": pairs,
        "cross_accuracy_mean": float(np.mean([p["accuracy"] for p in pairs])),
        "cross_accuracy_max": max(p["accuracy"] for p in pairs),
        "cross_identical_predictions": sum(p["identical_predictions"] for p in pairs),
        "pixel_positions_shared_mean": float(np.mean([p["pixel_positions_shared"] for p in pairs])),
        "blocks_shared_mean": float(np.mean([p["blocks_shared"] for p in pairs])),
        "model_copies": len(keys),
        "model_bytes": model_bytes,
        "copies_bytes": len(keys) * model_bytes,
        "keyed_bytes": tree_bytes(keyed),
    }


# ----------------------------------------------------------------------------- the section


def run(context: AttackContext, config: ViTCountermeasureConfig) -> dict:
    import numpy as np

    from convmixer_jax.attacks.wrong_keys import key_grid

    cfg = context.model_config
    keys = context.keys(config.vit_countermeasure_clients, 0, grid=key_grid(cfg))
    public = None if context.public_images is None else np.asarray(context.public_images)
    return per_client_keys(
        cfg,
        context.variables,
        context.eval_data,
        np.asarray(context.test_data[0]),
        keys,
        public_images=public,
        seed=context.seed(0),
        log=context.log,
    )


def summary_lines(r: dict) -> list[str]:
    """The section of ``summary.md``: accuracy, the leak across clients, what the provider
    still gets, and the cost."""
    if not r:
        return []
    c, n = r["clients"], r["images"]
    pairs = len(r["pairs"])
    mib = 1024 * 1024
    held = f"{r['queries']} quer{'y' if r['queries'] == 1 else 'ies'}"
    if r["public_images"]:
        held += f" and {r['public_images']:,} unlabeled public images"
    accuracies = ", ".join(f"{p['accuracy']:.4f}" for p in r["per_client"])
    return [
        "## Countermeasure on the ViT: a key per client",
        "",
        f"{c} clients, each with its own key with block scrambling ({r['grid'][0]} x "
        f"{r['grid'][1]} grid) and its own copy of the model rekeyed for it; every client's "
        f"images are the same {n:,} test images.",
        "",
        f"- Accuracy of each client's model on its own encrypted images: {accuracies} "
        f"(plain model on plain images {r['plain_accuracy']:.4f}); identical predictions "
        f"{r['identical_predictions']:,}/{c * n:,}.",
        f"- Leak across clients: the key the provider recovered for client A (A's model, "
        f"{held}) on client B's images, over {pairs} ordered pairs: B's model scores "
        f"{r['cross_accuracy_mean']:.4f} on average (at most {r['cross_accuracy_max']:.4f}; "
        f"with B's own key {r['plain_accuracy']:.4f}); A's key shares "
        f"{r['pixel_positions_shared_mean']:.3f} of B's pixel positions and "
        f"{r['blocks_shared_mean']:.3f} of its block places.",
        f"- A negative result: a key per client does not stop the provider. It holds every "
        f"client's model and sees every client's queries, so each client's key is open to "
        f"the same recovery as a single key is: here it gave {r['recovered_exact']} of {c} "
        f"clients' keys exactly ({r['recovered_exact_up_to_mirror']} up to the mirror twin; "
        f"{r['recovery_claimed']} claimed), and each client's model scores "
        f"{r['recovered_key_accuracy_mean']:.4f} on average on its images under the key "
        "recovered for it. What a key per client can do is keep one client's key from "
        "opening another client's model and images.",
        f"- Cost: {r['model_copies']} model copies, {r['copies_bytes'] / mib:.2f} MiB in all "
        f"instead of {r['model_bytes'] / mib:.2f} MiB; the copies differ only in the patch and "
        f"position embeddings ({r['keyed_bytes'] / mib:.3f} MiB per client).",
        "",
    ]


def describe(context: AttackContext, config: ViTCountermeasureConfig) -> str:
    return f"{config.vit_countermeasure_clients} clients"


ATTACK = Attack(
    name="vit_countermeasure",
    title="countermeasure on the ViT, a key per client",
    config_type=ViTCountermeasureConfig,
    run=run,
    summary=summary_lines,
    describe=describe,
    enabled=lambda config: bool(config.vit_countermeasure_clients),
    families=("vit",),
    needs_reference=False,
    family_note="it rekeys a ViT's patch and position embeddings per client",
)
