"""The main job (placeholder until the experiments land): the printed tour."""

from __future__ import annotations

import argparse

from batchnorm import tour


def configure(parser: argparse.ArgumentParser) -> None:
    tour.configure(parser)


def run(args: argparse.Namespace) -> int:
    return tour.run(args)
