"""Experiments that reproduce the BN paper's results, each a pure function -> results.

The registry
------------
``EXPERIMENTS`` maps a name (what ``batchnorm experiment NAME`` takes) to the module that
implements it. Adding an experiment is one line here plus its module, which provides:

``NAME``
    the registry name, also written into checkpoints.
``Config``
    a dataclass of settings with defaults, derived from
    :class:`~batchnorm.app.experiments.common.Settings` (``seed``, ``data``, ``mnist_dir``)
    or :class:`~batchnorm.app.experiments.common.TrainSettings` (those, ``checkpoint_every``
    and ``threads``). The CLI sets the fields named ``steps``, ``seed``, ``lr``,
    ``init_std``, ``data`` and ``mnist_dir`` from ``--steps --seed --lr --init-std --data
    --mnist-dir`` when the dataclass has them.
``run(config, *, data=None, progress=no_progress, checkpoint=None) -> results``
    a pure function of its config (and data); ``progress(done, total, text)`` reports now
    and then; ``checkpoint`` (:class:`batchnorm.app.experiments.common.Checkpoint`) is saved
    periodically and on KeyboardInterrupt, and ``checkpoint.state`` resumes a run.
    :class:`~batchnorm.app.experiments.common.Experiment` makes it from the module's check
    of the settings and its body; sweeps over independent nets use
    :func:`~batchnorm.app.experiments.common.sweep_experiment`.
``Results``
    the results dataclass, with ``to_dict()`` (JSON data) and ``from_dict(d)``, derived from
    :class:`~batchnorm.app.experiments.common.RunResults` (config, dataset, seconds,
    completed), ``StepResults`` (histories at training steps) or ``SweepResults`` (one dict
    per net).
``summary(results) -> list[(label, value)]`` and ``figures(results) -> list[report.Figure]``
    the printed table rows and the report's figures (the module draws its own).
``QUESTION``, ``CLAIM`` and ``verdict(results) -> str`` (optional)
    the report's heading, the claim tested, and whether this run agrees, in words.

A training loop takes its steps with :func:`~batchnorm.app.experiments.common.train_step`
(one net of a sweep: :func:`~batchnorm.app.experiments.common.train_net`) and calls
:func:`~batchnorm.app.experiments.common.check_interrupt` where a step is complete: Ctrl-C
then stops there, so the checkpoint it writes is a state the uninterrupted run passes
through too.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS: dict[str, str] = {
    "fig1": "batchnorm.app.experiments.fig1",
    "depth": "batchnorm.app.experiments.depth",
    "batch-size": "batchnorm.app.experiments.batch_size",
    "sync": "batchnorm.app.experiments.sync",
    "noisy-bn": "batchnorm.app.experiments.noisy_bn",
    "ics": "batchnorm.app.experiments.ics",
    "landscape": "batchnorm.app.experiments.landscape",
    "renorm": "batchnorm.app.experiments.renorm",
    "population": "batchnorm.app.experiments.population",
}


def get(name: str) -> ModuleType:
    """The module of experiment ``name``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {sorted(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])
