"""Experiments that reproduce the BN paper's results, each a pure function -> results.

The registry
------------
``EXPERIMENTS`` maps a name (what ``batchnorm experiment NAME`` takes) to the module that
implements it. Adding an experiment is one line here plus its module, which provides:

``NAME``
    the registry name, also written into checkpoints.
``Config``
    a dataclass of settings with defaults. The CLI sets the fields named ``steps``, ``seed``,
    ``lr``, ``init_std`` and ``mnist_dir`` from ``--steps --seed --lr --init-std --mnist-dir``
    when the dataclass has them.
``run(config, *, data=None, progress=no_progress, checkpoint=None) -> results``
    a pure function of its config (and data); ``progress(done, total, text)`` reports now
    and then; ``checkpoint`` (:class:`batchnorm.experiments.common.Checkpoint`) is saved
    periodically and on KeyboardInterrupt, and ``checkpoint.state`` resumes a run.
``Results``
    the results dataclass, with ``to_dict()`` (JSON data) and ``from_dict(d)``
    (:class:`batchnorm.experiments.common.JsonResults` gives both; sweeps over independent
    nets use :class:`~batchnorm.experiments.common.SweepResults` and
    :func:`~batchnorm.experiments.common.sweep`).
``summary(results) -> list[(label, value)]`` and ``figures(results) -> list[report.Figure]``
    the printed table rows and the report's figures.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS: dict[str, str] = {
    "fig1": "batchnorm.experiments.fig1",
    "depth": "batchnorm.experiments.depth",
    "batch-size": "batchnorm.experiments.batch_size",
    "sync": "batchnorm.experiments.sync",
    "renorm": "batchnorm.experiments.renorm",
    "population": "batchnorm.experiments.population",
}


def get(name: str) -> ModuleType:
    """The module of experiment ``name``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {sorted(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])
