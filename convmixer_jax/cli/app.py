"""The ``convmixer-jax`` command line: keys, image and model encryption, training, evaluation.

Each subcommand parses its arguments and calls library functions
(:mod:`~convmixer_jax.scheme.keys`, :mod:`~convmixer_jax.scheme.images`,
:mod:`~convmixer_jax.files.model_dir`, :mod:`~convmixer_jax.model.inference`,
:mod:`~convmixer_jax.training.loop`). JAX and Flax are imported inside the commands
so that ``--help`` answers at once.

A user error (bad file, key, image or model, existing output without
``--force``) prints one line ``convmixer-jax: error: ...`` on stderr, exits
with 1 (2 for a malformed command line) and leaves every output path as it
was. Every file is written under a temporary name beside its destination and
renamed into place when complete. SIGINT and SIGTERM, whenever they come, end the
command with 130 and 143, one line, and no output written.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
import warnings

from convmixer_jax._xla_flags import apply_cpu_flags

_DESCRIPTION = """\
Block-wise encryption of ConvMixer models (Iijima & Kiya, 2022).

A trusted party trains a plain model (train), makes a secret key (keygen) and
encrypts the model with it (encrypt-model); the client encrypts its images with
the same key (encrypt-images); the provider runs the encrypted model on the
encrypted images (predict) and gets the plain model's outputs on the plain images.
"""

_EPILOG = """\
example:
  convmixer-jax keygen --block-size 4 --channels 3 --out key.json
  convmixer-jax init-model --preset paper --seed 0 --out plain_model
  convmixer-jax encrypt-model --key key.json plain_model --out enc_model
  convmixer-jax encrypt-images --key key.json photos/ --out enc_photos/
  convmixer-jax predict enc_model enc_photos/

run 'convmixer-jax COMMAND --help' for the options of a command.
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("convmixer-jax")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    # the command modules import NumPy: imported here, so that main handles a signal
    # that comes while they load
    from convmixer_jax.cli import (
        attacks,
        experiment,
        images,
        keys,
        models,
        recover,
        torch_io,
        training,
    )
    from convmixer_jax.cli.options import PROG, Parser

    parser = Parser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.subcommands = {}

    def add(name, func, help_, description=None):
        p = sub.add_parser(name, help=help_, description=description or help_)
        p.set_defaults(func=func)
        parser.subcommands[name] = p
        return p

    for group in (keys, images, models, torch_io, training, attacks, recover, experiment):
        group.register(add)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every write cleans up as on Ctrl-C."""


# exit status and how the one line names each signal
_SIGNALS = {
    signal.SIGINT: (130, "interrupted"),
    signal.SIGTERM: (143, "terminated (SIGTERM)"),
}


# What a library's coroutine says when a signal stops it halfway (Orbax's saves): noise to
# a person, whose one line says what happened
_ABANDONED_COROUTINE = dict(message="coroutine .* was never awaited", category=RuntimeWarning)


def _exception_for(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class _Signals:
    """SIGINT and SIGTERM as exceptions in the main thread, from the first instruction of
    :func:`main` to the last, none of them lost.

    Python runs a signal handler at the next instruction of the main thread, and that
    can lie in a garbage-collector callback (JAX registers one), a ``__del__`` or a weakref
    callback, where an exception is printed as "Exception ignored" and dropped. So the
    handler records each signal before it raises; ``sys.unraisablehook`` raises a dropped
    one again in the next Python function the main thread calls (a one-shot trace
    function; every write calls one before it renames its output into place); and
    :meth:`settle` reports a recorded signal even if a library swallowed its exception.
    Once the command's outcome is settled, later signals are recorded and raise nothing:
    the command prints exactly one line.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.settled = False
        self.holding = True  # until release(): record signals, raise none
        self.reported = False  # an interrupt's line is out
        self._handlers: dict[int, object] = {}
        self._hook = None
        self._trace: tuple | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set in the main thread
        for signum in _SIGNALS:
            self._handlers[signum] = signal.signal(signum, self._on_signal)
        self._hook, sys.unraisablehook = sys.unraisablehook, self._on_unraisable

    def restore(self) -> None:
        self.settled = True
        if self.reported:
            # finalize now, while the hook drops what they raise, the objects that the
            # interrupt left half-made (an event loop whose __init__ it stopped, say)
            gc.collect()
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        if self._hook is not None and sys.unraisablehook == self._on_unraisable:
            sys.unraisablehook = self._hook
        if self._trace is not None:
            sys.settrace(self._trace[0])

    def release(self) -> None:
        """Stop holding signals back: raise the first one that came meanwhile, if any."""
        self.holding = False
        if self.received and not self.settled:
            raise _exception_for(self.received[0])

    def _on_signal(self, signum, frame) -> None:
        self.received.append(signum)
        if not (self.settled or self.holding):
            raise _exception_for(signum)

    def _on_unraisable(self, unraisable) -> None:
        if self.reported:
            return  # a consequence of the interruption, already reported in one line
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and self.received:
            if not (self.settled or self.holding):
                self._raise_at_next_call()
            return
        self._hook(unraisable)

    def _raise_at_next_call(self) -> None:
        """Raise the first signal's exception in the next Python function the main thread
        calls (or resumes) once the dropping context has ended (CPython removes a trace
        function once it raises; if that call drops it again, this runs again)."""
        exception = _exception_for(self.received[0])

        def trace(frame, event, arg):
            raise exception

        if self._trace is None:
            self._trace = (sys.gettrace(),)
        sys.settrace(trace)

    def settle(self) -> int | None:
        """End the command: later signals raise nothing. If a signal came whose exception a
        library swallowed, print its line and return its exit status; else None."""
        self.settled = True
        return self.report(None) if self.received else None

    def report(self, exc: KeyboardInterrupt | None) -> int:
        """Print the one line of the first signal (after closing any progress bar, with the
        ``message`` the interrupted code attached to ``exc``, if any); its exit status."""
        self.settled = True
        from convmixer_jax.cli.options import PROG

        if self.received:
            signum = self.received[0]
        else:  # raised without a signal (a test, or Python's own SIGINT handler)
            signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        status, what = _SIGNALS[signum]
        # for good: the coroutines are collected as late as the interpreter's exit
        warnings.filterwarnings("ignore", **_ABANDONED_COROUTINE)
        # a command stopped halfway through says what it kept and how to go on
        detail = getattr(exc, "message", None) or "nothing was written"
        _close_progress_bars()
        _quiet_after_failure()
        print(f"{PROG}: error: {what}; {detail}", file=sys.stderr, flush=True)
        self.reported = True
        return status


def _drop_unretrieved_task_errors(record) -> bool:
    return not str(record.msg).startswith("Task exception was never retrieved")


def _quiet_after_failure() -> None:
    """After the command's one error line: tasks that a library (Orbax) abandoned when the
    command failed are logged by asyncio as they are collected, up to the interpreter's
    exit; they repeat that error with tracebacks, so they are dropped for good."""
    import logging

    asyncio_logger = logging.getLogger("asyncio")
    if _drop_unretrieved_task_errors not in asyncio_logger.filters:
        asyncio_logger.addFilter(_drop_unretrieved_task_errors)


def _close_progress_bars() -> None:
    """Close every open tqdm bar, so that an error line starts a line of its own and no
    bar is drawn again after it (a closed bar is neither refreshed nor redrawn at exit)."""
    tqdm_std = sys.modules.get("tqdm.std")
    if tqdm_std is None:
        return
    bars = list(getattr(tqdm_std.tqdm, "_instances", ()))
    for bar in bars:
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot be redrawn must not hide the error
            pass
    if bars and sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")  # and what the terminal echoed after it (^C)


def _error(text: str, status: int) -> int:
    from convmixer_jax.cli.options import PROG

    _close_progress_bars()
    _quiet_after_failure()
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return status


def _disk_full_line(e: BaseException, out) -> str | None:
    """The one line for ``e`` if it is a full disk (or quota): an OSError, an exception
    raised from one, or a library's own error that quotes the system's message (TensorStore,
    under Orbax, raises a ValueError whose text ends so), naming the file the system names,
    else the command's output; None if ``e`` is something else."""
    import errno
    import os

    no_space = os.strerror(errno.ENOSPC)
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = e.filename if e.filename is not None else out
            break
        if no_space in str(e):
            where = out
            break
        e = e.__cause__ or e.__context__
    else:
        return None
    return (
        "no space left on device"
        + (f" while writing {where}" if where is not None else "")
        + "; free some space and run the command again"
    )


def _silence_abandoned_futures() -> None:
    """A save that failed on a full disk leaves the checkpoint library's futures holding
    exceptions nobody retrieves; asyncio logs each one, with the whole error, when they are
    collected, after the command's one line. The command ends with that line: drop them."""
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _run(argv: list[str] | None, signals: _Signals) -> int:
    """Parse ``argv`` and run the command: the exit status of its end, of bad input or of a
    signal whose exception a library swallowed."""
    from convmixer_jax.cli.options import UsageError, one_line
    from convmixer_jax.files.output_paths import set_writing_command

    parser = build_parser()
    args = None
    try:
        args, extra = parser.parse_known_args(argv)
        set_writing_command(args.command)
        if extra:  # report it against the subcommand, whose --help lists what it takes
            parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        status = args.func(args)
    except SystemExit as e:  # --help, --version
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UsageError as e:
        return signals.settle() or _error(str(e), 2)
    except (ValueError, OSError, OverflowError, RecursionError) as e:
        # Library errors (InvalidKeyError, ImageError, ModelDirError, DataError,
        # KeyModelMismatch are ValueErrors) and file errors: one line, no traceback.
        full = _disk_full_line(e, getattr(args, "out", None))
        if full is not None:
            _silence_abandoned_futures()
        return signals.settle() or _error(full or one_line(e), 1)
    except MemoryError:
        return signals.settle() or _error(
            "out of memory; use fewer images per file or a smaller --batch-size", 1
        )
    except Exception as e:
        # a library that wraps a full disk in an exception of its own (Orbax: Exception)
        text = _disk_full_line(e, getattr(args, "out", None))
        if text is None:
            raise
        _silence_abandoned_futures()
        return signals.settle() or _error(text, 1)
    return signals.settle() or status


def _reset_writing_command() -> None:
    output_paths = sys.modules.get("convmixer_jax.files.output_paths")
    if output_paths is not None:
        output_paths.set_writing_command("")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status.

    0 on success, 1 for bad input (one line on stderr, nothing written), 2 for a
    malformed command line, 130 on SIGINT and 143 on SIGTERM whenever it comes (one line,
    nothing written, temporaries removed).
    First adds the package's XLA:CPU flag to ``XLA_FLAGS``
    (``convmixer_jax.apply_cpu_flags``), before any command imports JAX.
    """
    signals = _Signals()
    signals.install()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", **_ABANDONED_COROUTINE)
            apply_cpu_flags()
            # the module that every error line needs (its name, PROG) loads whole: a signal
            # that comes meanwhile waits for it (a fraction of a second), then is raised
            import convmixer_jax.cli.options  # noqa: F401

            signals.release()
            return _run(argv, signals)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        return signals.report(e)
    finally:
        signals.restore()
        _reset_writing_command()


__all__ = ["main", "build_parser"]
