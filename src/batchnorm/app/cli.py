"""The ``batchnorm`` command. Each subcommand is a module of the application.

A subcommand module has ``configure(parser)`` (adds its options) and ``run(args) -> int``
(the exit status); heavy imports happen inside ``run``, so ``batchnorm --help`` stays quick.
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import ModuleType

from batchnorm.app import gradcheck, info, tour
from batchnorm.app.bench import command as bench
from batchnorm.app.experiments import command, demo


def commands() -> dict[str, tuple[ModuleType, str]]:
    """name -> (module, one-line help)."""
    return {
        "demo": (demo, "the main job: train with and without BN, plot, report"),
        "experiment": (command, "run one experiment (or all) in full"),
        "tour": (tour, "a printed walk through BN: the seed's test, then a BatchNorm2d"),
        "gradcheck": (gradcheck, "check gradients against finite differences and the seed"),
        "bench": (bench, "time ours against PyTorch (and JAX) at one API level"),
        "info": (info, "versions, backends and devices on this machine"),
    }


def build_parser() -> argparse.ArgumentParser:
    from batchnorm import __version__

    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch Normalization: exact, complete, fast and understandable.",
    )
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in commands().items():
        p = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.configure(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"batchnorm {args.command}: error: {exc}", file=sys.stderr)
        return 2


def entry() -> int:
    """The console script and ``python -m batchnorm.app``: :func:`main`; then a Ctrl-C that
    lands while the interpreter shuts down (the work done and saved) is ignored, so that the
    exit status stays main's instead of death by SIGINT."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(entry())
