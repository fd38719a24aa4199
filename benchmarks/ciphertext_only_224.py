"""Ciphertext-only key recovery at M = 7 on 224 x 224 images (pb = 147): CIFAR-10 test images
upsampled with match_scale, the template from 40 upsampled training images, the shipped prior.

    python benchmarks/ciphertext_only_224.py 5 2 12   # N = 5 encrypted images, 2 keys, 12 starts
"""
import sys, time, numpy as np
from convmixer_jax.data.loader import load_split
from convmixer_jax.scheme.keys import generate_key
from convmixer_jax.scheme.images import encrypt_images_reference
from convmixer_jax.attacks.ciphertext_only import block_template, recover_key_ciphertext_only, colour_key, match_scale, default_prior
from convmixer_jax.attacks.image_prior import colour_variants
tr, _, _ = load_split("train", data_dir="../shared/data/cifar10-jpeg", progress=False)
te, _, _ = load_split("test", data_dir="../shared/data/cifar10-jpeg", progress=False)
M = 7  # usage: python benchmarks/ciphertext_only_224.py N[,N...] KEYS STARTS
t0 = time.time(); pub = match_scale(tr[:40], 224, 224); T = block_template(pub, M); print("template", round(time.time() - t0, 1), T.windows, flush=True)
prior = default_prior(3)
for n in [int(a) for a in sys.argv[1].split(",")]:
    ex = lay = claimed = wrong = 0
    for trial in range(int(sys.argv[2])):
        key = generate_key(M, 3, seed=[n, trial, 224])
        idx = np.random.default_rng([n, trial, 224]).choice(len(te), n, replace=False)
        enc = encrypt_images_reference(match_scale(te[idx], 224, 224), key)
        r = recover_key_ciphertext_only(enc, M, T, prior=prior, starts=int(sys.argv[3]))
        g = r.best_guess
        ok = np.array_equal(g.perm, key.perm) and np.array_equal(g.flip, key.flip)
        lo = any(np.array_equal(colour_key(g, v).perm, key.perm) for v in colour_variants(3))
        ex += ok; lay += lo; claimed += r.determined; wrong += r.determined and not ok
        print(n, trial, ok, lo, r.determined, round(r.layout_margin, 1), round(r.colour_margin, 1), round(r.seconds, 1), r.reason[:70], flush=True)
    print("N", n, "exact", ex, "layout", lay, "claimed", claimed, "wrong", wrong, flush=True)
