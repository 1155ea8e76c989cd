"""The ``batchnorm`` command. Each subcommand lives beside the code it drives.

A subcommand is a module with ``configure(parser)`` (adds its options) and
``run(args) -> int`` (the exit status); heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("batchnorm.experiments.demo", "the main job: train with and without BN, plot, report"),
    "experiment": ("batchnorm.experiments.command", "run one experiment in full"),
    "tour": ("batchnorm.tour", "a printed walk through BN: the seed's test, then a BatchNorm2d"),
    "gradcheck": ("batchnorm.gradcheck", "check gradients against finite differences and the seed"),
    "bench": ("batchnorm.bench", "time the backends against PyTorch and memcpy"),
    "info": ("batchnorm.info", "versions, backends and devices on this machine"),
}


def build_parser() -> argparse.ArgumentParser:
    from batchnorm import __version__

    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch Normalization: exact, complete, fast and understandable.",
    )
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
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
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"batchnorm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
