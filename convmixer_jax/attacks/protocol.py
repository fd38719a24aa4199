"""The protocol every attack of the security report follows, and the context it runs in.

An attack is an :class:`Attack`: a ``name`` (its key in ``security.json``), a ``title``
(its line in the log), a frozen config dataclass whose fields are its options (declared
with :func:`option`; the command line's ``--options`` are generated from them), and the
functions ``run(context, config) -> result`` (JSON-serializable), ``summary(result) ->
markdown lines`` and, optionally, ``plot(context, result, path)``. It names the model
families it applies to (``families``); on a model of another family the report skips it
and records why (:meth:`Attack.skip_reason`).
:mod:`convmixer_jax.attacks.report` runs the attacks of one list, in its order; a new
attack is one module defining an :class:`Attack` plus one line in that list.

Each attack runs in its own :class:`AttackContext`: the model, the data, the side
information the report prepared once (a test subset for accuracies, unlabeled public
images, an independent reference model) and the attack's own random stream, a
:class:`numpy.random.SeedSequence` spawned for it from the report's seed.

Importing this module imports neither NumPy nor JAX, so that the command line's
``--help`` stays fast; they are imported where they are used.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from convmixer_jax.model.config import ModelConfig
    from convmixer_jax.scheme.keys import Key

#: How many samples an accuracy evaluates per forward pass of the model.
EVAL_BATCH_SIZE = 500
#: How a report names each model family (a config's ``family``).
FAMILY_NAMES = {"convmixer": "ConvMixer", "vit": "ViT"}


# ----------------------------------------------------------------------------- options


def option(
    default: Any,
    help: str,
    *,
    metavar: str | None = None,
    minimum: int | None = None,
    choices: Sequence[str] | None = None,
    command_line: bool = True,
) -> Any:
    """A field of a frozen config dataclass that is one option of the report.

    ``help``: the command line's help text; ``{default}`` in it reads as the default as
    typed on the command line (values of a tuple joined by spaces). ``minimum``: 1 for a
    positive integer, 0 for a non-negative one (a seed), None for any integer.
    ``command_line=False``: an option of the library only.
    """
    metadata = {
        "help": help,
        "metavar": metavar,
        "minimum": minimum,
        "choices": None if choices is None else tuple(choices),
        "command_line": command_line,
    }
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OptionSpec:
    """One option as the command line shows it.

    ``name``: the field's name (``--name-with-dashes`` on the command line); ``type``:
    ``int`` or ``str`` (of each value when ``many``); ``many``: a tuple of one or more
    values; ``help``: with the default filled in.
    """

    name: str
    type: type
    many: bool
    default: Any
    help: str
    metavar: str | None
    minimum: int | None
    choices: tuple[str, ...] | None
    command_line: bool

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _value_type(annotation: Any) -> tuple[type, bool]:
    """(type of each value, whether a tuple) of an annotation like ``int``, ``str | None``
    or ``tuple[int, ...]``."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"an option is one type or None, not {annotation}")
        return _value_type(rest[0])
    if typing.get_origin(annotation) is tuple:
        return args[0], True
    if annotation in (int, str):
        return annotation, False
    raise TypeError(f"an option is an int, a str or a tuple of them, not {annotation}")


def options_of(config_type: type) -> list[OptionSpec]:
    """The options of one frozen config dataclass, in the order of its fields."""
    hints = typing.get_type_hints(config_type)
    out = []
    for f in dataclasses.fields(config_type):
        if "help" not in f.metadata:
            raise TypeError(f"{config_type.__name__}.{f.name} is not declared with option()")
        kind, many = _value_type(hints[f.name])
        shown = " ".join(map(str, f.default)) if many else str(f.default)
        out.append(
            OptionSpec(
                name=f.name,
                type=kind,
                many=many,
                default=f.default,
                help=f.metadata["help"].replace("{default}", shown),
                metavar=f.metadata["metavar"],
                minimum=f.metadata["minimum"],
                choices=f.metadata["choices"],
                command_line=f.metadata["command_line"],
            )
        )
    return out


def merged_options(config_types: Sequence[type]) -> list[OptionSpec]:
    """The flat options of several configs, in order of first appearance.

    A name several configs declare is one option (the number of encrypted images the
    ciphertext-only and the countermeasure sections both attack, for example); they must
    declare it alike.
    """
    seen: dict[str, tuple[OptionSpec, str]] = {}
    for config_type in config_types:
        for spec in options_of(config_type):
            if spec.name not in seen:
                seen[spec.name] = spec, config_type.__name__
            elif seen[spec.name][0] != spec:
                raise TypeError(
                    f"option {spec.name!r} is declared differently by {seen[spec.name][1]} "
                    f"and {config_type.__name__}"
                )
    return [spec for spec, _ in seen.values()]


def config_from_options(config_type: type, values: Mapping[str, Any]) -> Any:
    """An instance of ``config_type`` from the values of those of its options that
    ``values`` holds (the others keep their defaults); sequences become tuples."""
    kwargs = {}
    for spec in options_of(config_type):
        if spec.name in values:
            value = values[spec.name]
            kwargs[spec.name] = tuple(value) if spec.many and value is not None else value
    return config_type(**kwargs)


# ----------------------------------------------------------------------------- random streams


def child_stream(stream: np.random.SeedSequence, index: int) -> np.random.SeedSequence:
    """The ``index``-th child of ``stream``: what ``stream.spawn`` gives as child ``index``,
    without changing ``stream`` (the same index gives the same child every time)."""
    import numpy as np

    return np.random.SeedSequence(
        stream.entropy, spawn_key=(*stream.spawn_key, index), pool_size=stream.pool_size
    )


def stream_seed(stream: np.random.SeedSequence, index: int = 0) -> int:
    """A 32-bit integer seed drawn from child ``index`` of ``stream``, for the functions that
    take an integer seed."""
    return int(child_stream(stream, index).generate_state(1)[0])


def seeded_keys(n: int, block_size: int, channels: int, seed: int | None, grid=None) -> list[Key]:
    """``n`` secret keys: from the OS CSPRNG when ``seed`` is None, else the keys
    ``generate_key(..., seed=[seed, i])`` for i = 0..n-1. With ``grid`` (gh, gw) the keys
    also scramble the blocks of that grid (a ViT's keys); a seeded key's pixel key is the
    same with or without it."""
    from convmixer_jax.scheme.keys import generate_key

    if seed is None:
        return [generate_key(block_size, channels, grid=grid) for _ in range(n)]
    return [generate_key(block_size, channels, seed=[seed, i], grid=grid) for i in range(n)]


# ----------------------------------------------------------------------------- the context


def _silent(message: str) -> None:
    pass


@dataclass(frozen=True)
class AttackContext:
    """What an attack of the report runs on.

    model_config, variables: the plain trained model (a ConvMixer or a ViT config and its
    variables). train_data, test_data, eval_data: (images (N, H, W, C) uint8, labels (N,)
    int); ``eval_data`` is the random subset of the test data the accuracies are measured
    on. public_images: (N, H, W, C) uint8 unlabeled training images an adversary may
    hold, or None. reference_variables: an independently trained plain model of the same
    architecture, or None (also when no attack of the report reads it), with a note on
    where it came from. stream: this attack's :class:`numpy.random.SeedSequence`;
    ``seeded``: whether the report was given a seed (if not, the secret keys come from
    the OS CSPRNG). out_dir: the folder the report writes (an attack may put more files
    there). section: the attack's place in the list, as ``"2/5"``.
    """

    model_config: ModelConfig
    variables: Any
    train_data: tuple
    test_data: tuple
    eval_data: tuple
    stream: np.random.SeedSequence
    seeded: bool = False
    public_images: np.ndarray | None = None
    reference_variables: Any = None
    reference_note: str = ""
    out_dir: Path | None = None
    section: str = ""
    progress: bool = False
    log: Callable[[str], None] = _silent
    #: values computed once and shared by the attacks of one report (see :meth:`shared`)
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def seed(self, index: int = 0) -> int:
        """Integer seed number ``index`` of the attack's non-secret randomness (image
        subsets, initializations)."""
        return stream_seed(child_stream(self.stream, 0), index)

    def key_seed(self, index: int = 0) -> int | None:
        """Integer seed number ``index`` of the attack's secret keys (a branch of its stream
        apart from :meth:`seed`'s), or None (the OS CSPRNG) when the report has no seed."""
        return stream_seed(child_stream(self.stream, 1), index) if self.seeded else None

    def keys(self, n: int, index: int = 0, grid=None) -> list[Key]:
        """``n`` secret keys of the model's block size and channels (:func:`seeded_keys`
        with :meth:`key_seed`); with ``grid`` (gh, gw) keys that also scramble the blocks
        of that grid."""
        cfg = self.model_config
        return seeded_keys(n, cfg.patch_size, cfg.channels, self.key_seed(index), grid)

    def shared(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed once for all the attacks of one report."""
        if name not in self.memo:
            self.memo[name] = compute()
        return self.memo[name]

    def plain_accuracy(self) -> float:
        """Accuracy of the plain model on the plain ``eval_data``, in [0, 1]."""
        from convmixer_jax.model.inference import accuracy

        def compute():
            x, y = self.eval_data
            return accuracy(self.model_config, self.variables, x, y, batch_size=EVAL_BATCH_SIZE)

        return self.shared("plain_accuracy", compute)


# ----------------------------------------------------------------------------- the attack


def _always(config: Any) -> bool:
    return True


def _no_detail(context: AttackContext, config: Any) -> str:
    return ""


@dataclass(frozen=True)
class Attack:
    """One attack of the security report.

    name: its key in ``security.json``. title: its line in the log, followed by
    ``describe(context, config)``. config_type: a frozen dataclass of :func:`option`
    fields. run(context, config): the result, a JSON-serializable dict (or list).
    summary(result): the markdown lines of its section of ``summary.md``.
    plot(context, result, path): draws the result into the file named ``figure``, if
    given. enabled(config): False skips the attack. seconds_key: where the report records
    the time the run took: that key of a dict result, or ``<name>_<seconds_key>`` beside
    a list result. families: the model families (a config's ``family``) the attack
    applies to; ``family_note`` says why it applies to those only. needs_reference: the
    attack reads the context's ``reference_variables``; a report none of whose running
    attacks needs the reference neither loads nor trains one.
    """

    name: str
    title: str
    config_type: type
    run: Callable[[AttackContext, Any], Any]
    summary: Callable[[Any], list[str]]
    describe: Callable[[AttackContext, Any], str] = _no_detail
    plot: Callable[[AttackContext, Any, Path], None] | None = None
    figure: str = ""
    enabled: Callable[[Any], bool] = _always
    seconds_key: str = "seconds"
    families: tuple[str, ...] = ("convmixer",)
    family_note: str = ""
    needs_reference: bool = False

    def skip_reason(self, model_config: Any) -> str | None:
        """None when the attack applies to a model of ``model_config``'s family; else the
        one line the report records for skipping it (``applies to ConvMixer models only:
        ...``)."""
        family = getattr(model_config, "family", "convmixer")
        if family in self.families:
            return None
        names = " and ".join(FAMILY_NAMES.get(f, f) for f in self.families)
        note = f": {self.family_note}" if self.family_note else ""
        return f"applies to {names} models only{note}"
