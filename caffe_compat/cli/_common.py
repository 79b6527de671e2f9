"""What the command-line tools share: Caffe's flag parsing quirks (``-solver`` as ``--solver``),
--gpu, one-line errors."""

from __future__ import annotations

import argparse
import functools
import sys

from caffe_compat.errors import CaffeError

__all__ = [
    "UsageError",
    "ArgumentParser",
    "enable_python_layers",
    "exits_130_on_interrupt",
    "parse_gpus",
    "select_device",
    "report_error",
    "stages_from_flag",
]


class UsageError(CaffeError):
    """A bad command line (the tools print it as one line and exit 1)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise ``UsageError`` instead of printing usage and exiting 2.

    ``python_layers=True`` adds ``--allow-python-layers``: the explicit opt-in to nets whose
    ``Python`` layers run the code their prototxt names (also passed on to worker processes).
    """

    def __init__(self, *args, python_layers: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if python_layers:
            self.add_argument(
                "--allow-python-layers",
                action="store_true",
                help="run the net's Python layers (they execute the code their prototxt names)",
            )

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        # gflags, which the caffe binary uses, also takes long flags with one dash: -solver x
        known = {s for a in self._actions for s in a.option_strings if s.startswith("--")}
        args = [
            "-" + a if a[:1] == "-" and a[1:2] != "-" and "-" + a.partition("=")[0] in known else a
            for a in (sys.argv[1:] if args is None else list(args))
        ]
        return super().parse_args(args, namespace)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def enable_python_layers(args: argparse.Namespace) -> None:
    """After parsing (``parse_args`` has no side effects): with ``--allow-python-layers``, let the
    net's Python layers run, here and in the worker processes this tool starts (environment)."""
    if getattr(args, "allow_python_layers", False):
        import os

        from caffe_compat.layers.python import allow_python_layers

        allow_python_layers(True)
        os.environ["CAFFE_COMPAT_ALLOW_PYTHON_LAYERS"] = "1"  # worker processes inherit it


def exits_130_on_interrupt(prog: str):
    """Decorate a tool's ``main``: Ctrl-C (KeyboardInterrupt, e.g. while a net is built or data is
    read) prints one line and returns 130, the shell's status for SIGINT, without a traceback.
    (Training itself handles SIGINT as Caffe does: ``--sigint_effect``.)"""

    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
                return 130

        return run

    return wrap


def stages_from_flag(stage: str) -> list[str]:
    """``--stage a,b`` as Caffe's get_stages_from_flags (empty flag: no stage)."""
    return [s for s in stage.split(",") if s] if stage else []


def parse_gpus(flag: str | None) -> list[int]:
    """``--gpu 0`` / ``0,1`` / ``all`` -> device ids; raises ``UsageError`` when CUDA is absent."""
    if not flag:
        return []
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--gpu {flag}: no CUDA device is available to torch; run without --gpu to use the CPU")
    if flag == "all":
        return list(range(torch.cuda.device_count()))
    try:
        ids = [int(s) for s in flag.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--gpu {flag!r}: expected a device id, a comma-separated list or 'all'") from None
    n = torch.cuda.device_count()
    for i in ids:
        if not 0 <= i < n:
            raise UsageError(f"--gpu {flag}: no GPU {i}; torch sees {n} device(s) (0..{n - 1})")
    return ids


def select_device(gpus: list[int], log) -> None:
    """Set caffe_compat's global mode: CPU, or the one GPU in ``gpus`` (a process of a
    multi-GPU run passes its own GPU)."""
    from caffe_compat import mode

    if not gpus:
        log.info("Use CPU.")
        mode.set_mode_cpu()
        return
    if len(gpus) > 1:
        raise UsageError(
            f"--gpu {','.join(map(str, gpus))}: this tool runs on one device; give one device id (--gpu 0). "
            "Only tools/train.py uses several GPUs (one process per GPU)"
        )
    log.info("Use GPU with device ID %d", gpus[0])
    mode.set_device(gpus[0])
    mode.set_mode_gpu()


def report_error(prog: str, e: BaseException) -> int:
    """Print ``prog: error: message`` on one line to stderr; return the exit status 1."""
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 1
