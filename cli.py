"""
What train.py and evaluate.py share around the method: flags made from the config dataclasses, and the way
a command ends, in one line (a problem the user can fix, Ctrl-C) rather than a traceback.
"""

import argparse
import contextlib
import signal
import sys
import threading
from dataclasses import fields

import clip_vit
import moa


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that a bad flag ends in one `error:` line and a pointer to --help."""

    def error(self, message):
        self.exit(2, f"error: {message}\n(python {self.prog} --help lists every flag)\n")


# "2,5,8,11" -> (2, 5, 8, 11); a typo reads "invalid int_list value"
def int_list(text):
    return tuple(map(int, text.split(",")))


# "0" or "1" -> False or True
def zero_one(text):
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"{text!r} is not 0 or 1")
    return text == "1"


METAVARS = {int: "N", float: "X", bool: "0/1", tuple: "LIST"}


def add_options(parser, config):
    """A flag per field of the dataclass `config` (moa.option's): --num-experts for num_experts, with the
    field's default, type, choices and help."""
    for f in fields(config):
        kind = type(f.default)
        parser.add_argument(
            moa.flag(f.name),
            type={bool: zero_one, tuple: int_list}.get(kind, kind),
            default=f.default,
            choices=f.metadata["choices"],
            metavar=f.metadata["metavar"] or METAVARS.get(kind),
            help=f"{f.metadata['help']} (default: {moa.typed(f.default)})",
        )


def config_of(config, args):
    """The `config` dataclass from the flags of add_options; a broken rule: UserError."""
    return config(**{f.name: getattr(args, f.name) for f in fields(config)})


# Ctrl-C as run() sets it up: a KeyboardInterrupt where Python raises it, and a mark for a library that
# swallows it (torch.save does; so do some ops under load), which stop_if_interrupted() acts on
CTRL_C = threading.Event()


def on_ctrl_c(signum, frame):
    CTRL_C.set()
    raise KeyboardInterrupt


def stop_if_interrupted():
    """At a safe point of a loop: a Ctrl-C that some library swallowed stops the run here."""
    if CTRL_C.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def sigint_held():
    """Ctrl-C inside the block waits for its end (a checkpoint being written stays whole, and torch.save
    would swallow it), then stops the run as Ctrl-C does."""
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def run(main, interrupted, memory_hint, on_failure=lambda: None):
    """main(), ending a command as a user expects: a problem they can fix in one `error:` line (exit 1), out
    of memory too (with memory_hint), and Ctrl-C in one line that interrupted() words (exit 130, as a shell
    reports a program stopped by SIGINT); on_failure() first. A bug keeps its traceback."""
    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        main()
    except clip_vit.UserError as e:
        on_failure()
        sys.exit(f"error: {e}")
    # torch's allocators raise RuntimeErrors (torch.OutOfMemoryError on a GPU) that say "memory"
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "memory" not in str(e).split("\n")[0]:
            raise
        on_failure()
        sys.exit(f"error: out of memory ({' '.join(str(e).split())[:120]}); {memory_hint}")
    except KeyboardInterrupt:
        on_failure()
        print(f"interrupted: {interrupted()}", file=sys.stderr)
        sys.exit(130)
