"""Keys: generation, batches under jit/vmap, the JSON file format and its validation."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convmixer_jax.scheme.keys import (
    KEY_FORMAT,
    KEY_VERSION,
    InvalidKeyError,
    Key,
    block_len,
    fingerprint,
    generate_key,
    inverse_permutation,
    key_file_text,
    key_from_json,
    key_space,
    key_space_log2,
    key_to_json,
    load_key,
    make_key,
    random_keys,
    stack_keys,
    validate_key,
)

FAST = settings(max_examples=20, deadline=None, database=None)

# (block size, channels) pairs with pb = M*M*C >= 2, odd and even, and patch 7 on RGB.
SHAPES = [(m, c) for m in range(1, 7) for c in range(1, 5) if m * m * c >= 2] + [(7, 3)]


def assert_valid_key(perm, flip, pb):
    perm, flip = np.asarray(perm), np.asarray(flip)
    assert perm.shape == (pb,) and flip.shape == (pb,)
    assert np.array_equal(np.sort(perm), np.arange(pb)), "perm is not a permutation"
    assert set(np.unique(flip).tolist()) <= {0, 1}
    assert int(flip.sum()) == pb // 2


def valid_obj(m=2, c=1):
    key = generate_key(m, c, seed=7)
    return key_to_json(key)


# ---------------------------------------------------------------- generate_key


@given(st.sampled_from(SHAPES))
@FAST
def test_generate_key_is_valid(shape):
    m, c = shape
    pb = m * m * c
    key = generate_key(m, c)
    assert (key.block_size, key.channels, key.block_len) == (m, c, pb)
    assert_valid_key(key.perm, key.flip, pb)
    assert np.asarray(key.perm).dtype == np.int32
    assert np.asarray(key.flip).dtype == np.uint8


def test_generate_key_csprng_differs_each_call():
    # pb = 48: the chance of two equal perms (or flips, C(48, 24) ~ 3e13) is negligible.
    keys = [generate_key(4, 3) for _ in range(5)]
    perms = {tuple(np.asarray(k.perm).tolist()) for k in keys}
    flips = {tuple(np.asarray(k.flip).tolist()) for k in keys}
    assert len(perms) == 5 and len(flips) == 5
    assert len({fingerprint(k) for k in keys}) == 5


def test_generate_key_csprng_is_not_numpy_global_state():
    np.random.seed(0)
    a = generate_key(4, 3)
    np.random.seed(0)
    b = generate_key(4, 3)
    assert not np.array_equal(a.perm, b.perm)


@given(st.sampled_from(SHAPES), st.integers(0, 2**32 - 1))
@FAST
def test_generate_key_seeded_is_reproducible(shape, seed):
    m, c = shape
    a, b = generate_key(m, c, seed=seed), generate_key(m, c, seed=seed)
    np.testing.assert_array_equal(a.perm, b.perm)
    np.testing.assert_array_equal(a.flip, b.flip)
    assert fingerprint(a) == fingerprint(b)
    assert_valid_key(a.perm, a.flip, m * m * c)


def test_generate_key_seeds_differ():
    a, b = generate_key(4, 3, seed=1), generate_key(4, 3, seed=2)
    assert not np.array_equal(a.perm, b.perm)
    assert not np.array_equal(a.flip, b.flip)


def test_generate_key_flip_is_not_biased_to_a_fixed_pattern():
    # Over many seeded keys every position is flipped sometimes and not flipped sometimes,
    # and every value lands on every position of perm sometimes.
    keys = [generate_key(2, 1, seed=s) for s in range(200)]
    flips = np.stack([np.asarray(k.flip) for k in keys])
    perms = np.stack([np.asarray(k.perm) for k in keys])
    assert np.all(flips.mean(axis=0) > 0.3) and np.all(flips.mean(axis=0) < 0.7)
    for pos in range(4):
        assert set(perms[:, pos].tolist()) == {0, 1, 2, 3}


def test_a_block_of_one_value_is_refused():
    # pb = 1 has one key, the identity: nothing to encrypt
    with pytest.raises(InvalidKeyError, match="identity"):
        generate_key(1, 1)
    with pytest.raises(InvalidKeyError):
        generate_key(1, 1, seed=0)
    with pytest.raises(InvalidKeyError):
        key_space(1, 1)
    with pytest.raises(InvalidKeyError):
        random_keys(jax.random.key(0), 2, 1, 1)


@pytest.mark.parametrize("m,c", [(3, 1), (3, 3), (5, 1), (1, 3), (7, 3)])
def test_odd_block_length_has_floor_half_flips(m, c):
    pb = m * m * c
    for key in (generate_key(m, c), generate_key(m, c, seed=3)):
        assert_valid_key(key.perm, key.flip, pb)
        assert int(np.sum(key.flip)) == (pb - 1) // 2  # 73 for pb = 147
    batch = random_keys(jax.random.key(0), 3, m, c)
    assert np.asarray(batch.flip).sum(axis=1).tolist() == [(pb - 1) // 2] * 3
    with pytest.raises(InvalidKeyError, match=r"floor\(pb/2\)"):  # the other split is not a key
        make_key(np.arange(pb), [1] * (pb - pb // 2) + [0] * (pb // 2), m, c)
    assert key_space(m, c) == math.factorial(pb) * math.comb(pb, (pb - 1) // 2)


@pytest.mark.parametrize("m,c", [(0, 3), (4, 0), (-2, 3), (2.0, 1), (True, 2), ("4", 3)])
def test_bad_block_size_or_channels_refused(m, c):
    with pytest.raises(InvalidKeyError):
        generate_key(m, c)


def test_block_len():
    assert block_len(4, 3) == 48
    assert block_len(1, 2) == 2
    assert block_len(3, 2) == 18


# ---------------------------------------------------------------- random_keys

# jax.random.permutation is slow to compile on a busy CPU: compile each batch shape once.
_random_keys_jit = jax.jit(random_keys, static_argnums=(1, 2, 3))
N_KEYS = 32


@pytest.mark.parametrize("m,c", [(2, 2), (4, 3)])
def test_random_keys_under_jit(m, c):
    pb = m * m * c
    keys = _random_keys_jit(jax.random.key(3), N_KEYS, m, c)
    assert isinstance(keys, Key)
    assert (keys.block_size, keys.channels) == (m, c)
    assert keys.batch_shape == (N_KEYS,)
    assert keys.perm.shape == (N_KEYS, pb) and keys.flip.shape == (N_KEYS, pb)
    assert keys.perm.dtype == np.int32 and keys.flip.dtype == np.uint8
    perms, flips = np.asarray(keys.perm), np.asarray(keys.flip)
    for i in range(N_KEYS):
        assert_valid_key(perms[i], flips[i], pb)
    validate_key(keys[5])  # a single selected key validates too
    # the same rng gives the same batch; pb >= 8 makes collisions negligible
    again = _random_keys_jit(jax.random.key(3), N_KEYS, m, c)
    np.testing.assert_array_equal(again.perm, perms)
    np.testing.assert_array_equal(again.flip, flips)
    assert len({tuple(r) for r in perms.tolist()}) == N_KEYS
    if pb >= 48:  # C(48, 24) flips: distinct too
        assert len({tuple(r) for r in flips.tolist()}) == N_KEYS
    other = _random_keys_jit(jax.random.key(4), N_KEYS, m, c)
    assert not np.array_equal(np.asarray(other.perm), perms)


def test_random_keys_under_vmap():
    rngs = jax.random.split(jax.random.key(5), 4)
    keys = jax.jit(jax.vmap(lambda r: random_keys(r, 3, 2, 2)))(rngs)
    pb = 8
    assert keys.perm.shape == (4, 3, pb) and keys.flip.shape == (4, 3, pb)
    assert keys.batch_shape == (4, 3)
    assert (keys.block_size, keys.channels) == (2, 2)
    perms, flips = np.asarray(keys.perm), np.asarray(keys.flip)
    rows = set()
    for a in range(4):
        for b in range(3):
            assert_valid_key(perms[a, b], flips[a, b], pb)
            rows.add((tuple(perms[a, b].tolist()), tuple(flips[a, b].tolist())))
    assert len(rows) == 12


def test_key_batch_is_a_pytree_with_static_shape_fields():
    keys = _random_keys_jit(jax.random.key(0), N_KEYS, 2, 2)
    leaves, treedef = jax.tree_util.tree_flatten(keys)
    assert len(leaves) == 2
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (rebuilt.block_size, rebuilt.channels) == (2, 2)
    sub = keys[1:3]
    assert sub.batch_shape == (2,)
    np.testing.assert_array_equal(sub.perm, np.asarray(keys.perm)[1:3])


def test_stack_keys_and_inverse_permutation():
    ks = [generate_key(2, 2, seed=s) for s in range(3)]
    batch = stack_keys(ks)
    assert batch.perm.shape == (3, 8)
    for i, k in enumerate(ks):
        np.testing.assert_array_equal(batch.perm[i], k.perm)
        np.testing.assert_array_equal(batch.flip[i], k.flip)
        inv = np.asarray(inverse_permutation(k.perm))
        np.testing.assert_array_equal(np.asarray(k.perm)[inv], np.arange(8))
        np.testing.assert_array_equal(inv[np.asarray(k.perm)], np.arange(8))
    with pytest.raises(InvalidKeyError):
        stack_keys([])
    with pytest.raises(InvalidKeyError):
        stack_keys([generate_key(2, 2, seed=0), generate_key(2, 1, seed=0)])


# ---------------------------------------------------------------- JSON and fingerprint


@given(st.sampled_from(SHAPES), st.integers(0, 2**31))
@FAST
def test_json_round_trip(shape, seed):
    m, c = shape
    key = generate_key(m, c, seed=seed)
    obj = key_to_json(key)
    assert obj["format"] == KEY_FORMAT and obj["version"] == KEY_VERSION
    assert (obj["block_size"], obj["channels"]) == (m, c)
    assert obj["perm"] == np.asarray(key.perm).tolist()
    assert obj["flip"] == np.asarray(key.flip).tolist()
    back = key_from_json(json.loads(json.dumps(obj)))
    np.testing.assert_array_equal(back.perm, key.perm)
    np.testing.assert_array_equal(back.flip, key.flip)
    assert (back.block_size, back.channels) == (m, c)
    assert fingerprint(back) == fingerprint(key)
    # the file text carries the fingerprint and parses back too
    text = key_file_text(key)
    parsed = json.loads(text)
    assert parsed["fingerprint"] == fingerprint(key)
    again = key_from_json(parsed)
    np.testing.assert_array_equal(again.perm, key.perm)


def test_load_key_file(tmp_path):
    key = generate_key(4, 3, seed=11)
    path = tmp_path / "k.json"
    path.write_text(key_file_text(key))
    back = load_key(path)
    np.testing.assert_array_equal(back.perm, key.perm)
    np.testing.assert_array_equal(back.flip, key.flip)
    with pytest.raises(InvalidKeyError, match="does not exist"):
        load_key(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidKeyError, match="not valid JSON"):
        load_key(bad)
    edited = json.loads(path.read_text())
    edited["perm"][0], edited["perm"][1] = edited["perm"][1], edited["perm"][0]
    path.write_text(json.dumps(edited))
    with pytest.raises(InvalidKeyError, match="fingerprint"):
        load_key(path)


def test_fingerprint_known_answer_and_stability():
    key = make_key([2, 0, 3, 1], [1, 0, 0, 1], 2, 1)
    canonical = (
        '{"block_size":2,"channels":1,"flip":[1,0,0,1],'
        '"format":"convmixer-jax-key","perm":[2,0,3,1],"version":1}'
    )
    expected = hashlib.sha256(canonical.encode()).hexdigest()
    assert fingerprint(key) == expected
    # independent of the arrays' dtypes / containers
    key2 = Key(np.array([2, 0, 3, 1], np.int64), np.array([1, 0, 0, 1], np.int64), 2, 1)
    assert fingerprint(key2) == expected
    assert fingerprint(make_key([2, 0, 3, 1], [0, 1, 1, 0], 2, 1)) != expected
    assert fingerprint(make_key([0, 2, 3, 1], [1, 0, 0, 1], 2, 1)) != expected
    # same arrays, other shape fields -> other fingerprint
    assert fingerprint(make_key([2, 0, 3, 1], [1, 0, 0, 1], 1, 4)) != expected
    assert len(expected) == 64


def _mutations():
    """(name, function editing a valid key object in place) that must be refused."""

    def set_(field, value):
        def f(o):
            o[field] = value

        return f

    def delete(field):
        def f(o):
            del o[field]

        return f

    def perm_entry(i, value):
        def f(o):
            o["perm"][i] = value

        return f

    def flip_entry(i, value):
        def f(o):
            o["flip"][i] = value

        return f

    def flip_toggle_one(o):  # changes the number of ones
        o["flip"][0] = 1 - o["flip"][0]

    def flip_all_ones(o):
        o["flip"] = [1] * len(o["flip"])

    def flip_value_two(o):  # keep the sum, but use a value outside {0, 1}
        ones = [i for i, v in enumerate(o["flip"]) if v == 1]
        o["flip"][ones[0]] = 2
        o["flip"][ones[1]] = 0

    def perm_duplicate(o):
        o["perm"][0] = o["perm"][1]

    def perm_out_of_range(o):
        i = o["perm"].index(max(o["perm"]))
        o["perm"][i] = len(o["perm"])

    def perm_negative(o):
        i = o["perm"].index(0)
        o["perm"][i] = -1

    def perm_short(o):
        o["perm"] = o["perm"][:-1]

    def both_short(o):  # still a valid pair for a smaller pb, but not for the declared shape
        o["perm"] = [1, 0]
        o["flip"] = [1, 0]

    def both_long(o):
        n = len(o["perm"])
        o["perm"] = list(range(2 * n))
        o["flip"] = [1] * n + [0] * n

    def flip_short(o):
        o["flip"] = o["flip"][:-2]

    def block_size_mismatch(o):
        o["block_size"] = 4

    def channels_mismatch(o):
        o["channels"] = 2

    def perm_nested(o):
        o["perm"] = [o["perm"]]

    return [
        ("not a dict", None),
        ("format wrong", set_("format", "other")),
        ("format missing", delete("format")),
        ("version 2", set_("version", 2)),
        ("version string", set_("version", "1")),
        ("version missing", delete("version")),
        ("no block_size", delete("block_size")),
        ("no channels", delete("channels")),
        ("no perm", delete("perm")),
        ("no flip", delete("flip")),
        ("block_size float", set_("block_size", 2.0)),
        ("block_size str", set_("block_size", "2")),
        ("block_size bool", set_("block_size", True)),
        ("channels float", set_("channels", 1.0)),
        ("perm float entry", perm_entry(0, 0.0)),
        ("perm str entry", perm_entry(0, "0")),
        ("perm bool entry", perm_entry(0, False)),
        ("perm None entry", perm_entry(0, None)),
        ("perm not list", set_("perm", "0123")),
        ("perm dict", set_("perm", {"0": 1})),
        ("perm nested", perm_nested),
        ("flip float entry", flip_entry(0, 1.0)),
        ("flip bool entry", flip_entry(0, True)),
        ("flip not list", set_("flip", None)),
        ("perm duplicate", perm_duplicate),
        ("perm out of range", perm_out_of_range),
        ("perm negative", perm_negative),
        ("perm short", perm_short),
        ("flip short", flip_short),
        ("both short", both_short),
        ("both long", both_long),
        ("flip count +1", flip_toggle_one),
        ("flip all ones", flip_all_ones),
        ("flip value 2", flip_value_two),
        ("flip value -1", flip_entry(0, -1)),
        ("block_size disagrees", block_size_mismatch),
        ("channels disagrees", channels_mismatch),
        ("block_size zero", set_("block_size", 0)),
        ("pb of one value", set_("block_size", 1)),
    ]


@pytest.mark.parametrize("name,mutate", _mutations(), ids=[n for n, _ in _mutations()])
def test_key_from_json_rejects(name, mutate):
    if mutate is None:
        for bad in ([], "key", None, 3):
            with pytest.raises(InvalidKeyError):
                key_from_json(bad)
        return
    obj = valid_obj(2, 1)
    key_from_json(copy.deepcopy(obj))  # the unedited object is accepted
    mutate(obj)
    with pytest.raises(InvalidKeyError):
        key_from_json(obj)


@pytest.mark.parametrize("name,mutate", _mutations()[1:], ids=[n for n, _ in _mutations()[1:]])
def test_key_file_rejects_edits(tmp_path, name, mutate):
    """The same edits in a key file (with fingerprint) are refused by load_key."""
    obj = json.loads(key_file_text(generate_key(2, 1, seed=3)))
    mutate(obj)
    path = tmp_path / "k.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(InvalidKeyError):
        load_key(path)


def test_stale_fingerprint_detected_even_if_key_is_valid():
    key = generate_key(4, 3, seed=5)
    obj = json.loads(key_file_text(key))
    # a valid key of the same shape (swap two perm entries and two flip entries)
    obj["perm"][3], obj["perm"][7] = obj["perm"][7], obj["perm"][3]
    make_key(obj["perm"], obj["flip"], 4, 3)
    with pytest.raises(InvalidKeyError, match="fingerprint"):
        key_from_json(obj)
    obj = json.loads(key_file_text(key))
    i0 = obj["flip"].index(0)
    i1 = obj["flip"].index(1)
    obj["flip"][i0], obj["flip"][i1] = 1, 0
    with pytest.raises(InvalidKeyError, match="fingerprint"):
        key_from_json(obj)
    # a fingerprint of garbage is refused too; without a fingerprint the valid key is accepted
    obj = json.loads(key_file_text(key))
    obj["fingerprint"] = "0" * 64
    with pytest.raises(InvalidKeyError, match="fingerprint"):
        key_from_json(obj)
    del obj["fingerprint"]
    key_from_json(obj)


def test_make_key_and_validate_key_reject():
    with pytest.raises(InvalidKeyError):
        make_key([0, 1, 2, 2], [1, 1, 0, 0], 2, 1)
    with pytest.raises(InvalidKeyError):
        make_key([0, 1, 2, 3], [1, 1, 1, 0], 2, 1)
    with pytest.raises(InvalidKeyError):
        make_key([0.0, 1.0, 2.0, 3.0], [1, 1, 0, 0], 2, 1)
    with pytest.raises(InvalidKeyError):
        make_key([0, 1, 2, 3], [0.5, 0.5, 1, 0], 2, 1)
    with pytest.raises(InvalidKeyError):
        validate_key(
            _random_keys_jit(jax.random.key(0), N_KEYS, 2, 2)
        )  # a batch is not a single key
    k = make_key(np.array([3, 2, 1, 0], np.int64), np.array([True, False, True, False]), 2, 1)
    assert k.perm.dtype == np.int32 and k.flip.dtype == np.uint8
    np.testing.assert_array_equal(k.flip, [1, 0, 1, 0])


# ---------------------------------------------------------------- key space


def test_key_space_paper_value():
    pb = 48
    expected = math.factorial(pb) * math.comb(pb, pb // 2)
    n = key_space(4, 3)
    assert isinstance(n, int) and n == expected
    assert round(key_space_log2(4, 3), 2) == 247.82
    # exact integer, not a float rounded into an int
    assert n % math.factorial(48) == 0 and n // math.factorial(48) == 32247603683100


@pytest.mark.parametrize("m,c", [(1, 2), (2, 1), (1, 4), (1, 3), (1, 5)])
def test_key_space_counts_valid_keys_by_brute_force(m, c):
    pb = m * m * c
    count = 0
    for perm in itertools.permutations(range(pb)):
        for flip in itertools.product((0, 1), repeat=pb):
            try:
                make_key(list(perm), list(flip), m, c)
            except InvalidKeyError:
                continue
            count += 1
    assert count == key_space(m, c) == math.factorial(pb) * math.comb(pb, pb // 2)


@pytest.mark.parametrize("m,c", [(2, 1), (2, 3), (4, 3), (6, 4), (3, 1), (7, 3)])
def test_key_space_log2_matches_exact(m, c):
    pb = m * m * c
    exact = math.factorial(pb) * math.comb(pb, pb // 2)
    assert key_space(m, c) == exact
    assert key_space_log2(m, c) == pytest.approx(math.log2(exact), rel=1e-12)


# ---------------------------------------------------------------- no secret in repr


def test_repr_does_not_reveal_the_key():
    key = generate_key(4, 3, seed=1)
    perm = [int(v) for v in np.asarray(key.perm)]
    flip = [int(v) for v in np.asarray(key.flip)]
    for text in (repr(key), str(key), f"{key}", "%s" % (key,), repr([key]), repr({"k": key})):
        assert str(perm) not in text
        assert str(perm)[1:12] not in text
        assert ", ".join(map(str, perm[:4])) not in text
        assert " ".join(map(str, perm[:4])) not in text
        assert str(np.asarray(key.perm)) not in text
        assert str(flip) not in text
        assert ", ".join(map(str, flip[:8])) not in text
        assert "perm" not in text and "flip" not in text
        assert "block_size=4" in text and "channels=3" in text
    assert fingerprint(key)[:16] in repr(key)
    batch = _random_keys_jit(jax.random.key(0), N_KEYS, 4, 3)
    text = repr(batch)
    assert f"batch=({N_KEYS},)" in text and "perm" not in text
    row = [int(v) for v in np.asarray(batch.perm[0])]
    assert ", ".join(map(str, row[:4])) not in text
