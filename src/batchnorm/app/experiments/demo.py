"""The main job: why deeper networks train worse, and how BN fixes it, measured on MNIST.

First the BN paper's Figure 1 (the same sigmoid network trained with and without BN) on a
step budget of about a minute, then a quick depth sweep (sigmoid, tanh and ReLU MLPs of
growing depth, with and without BN). Prints a summary table and writes results.json, the
figures and a self-contained report.html to runs/demo-TIMESTAMP/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

DEMO_STEPS = 15_000
DEMO_DEPTHS = (2, 5, 10, 20, 30)
DEMO_DEPTH_STEPS = 200


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError as exc:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from exc


def configure(parser: argparse.ArgumentParser) -> None:
    from batchnorm.app.experiments.command import add_common_options, add_run_options

    add_common_options(parser, steps_help=f"fig1 training steps (default {DEMO_STEPS:,})")
    parser.add_argument("--depth-steps", type=int, default=None, metavar="N",
                        help=f"training steps per net in the depth sweep ({DEMO_DEPTH_STEPS})")
    parser.add_argument("--depths", type=_ints, default=None, metavar="D,D,...",
                        help="depths of the sweep (default " + ",".join(map(str, DEMO_DEPTHS))
                             + ")")
    parser.add_argument("--eval-every", type=int, default=None, help=argparse.SUPPRESS)
    add_run_options(parser)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's options as given (None: not given), under the names run.json keeps."""
    return {"steps": args.steps, "seed": args.seed, "lr": args.lr, "init_std": args.init_std,
            "mnist_dir": args.mnist_dir, "depth_steps": args.depth_steps,
            "depths": args.depths, "eval_every": args.eval_every, "data": args.data}


def with_defaults(given: dict[str, Any]) -> dict[str, Any]:
    out = dict(given)
    defaults = {"steps": DEMO_STEPS, "seed": 0, "depth_steps": DEMO_DEPTH_STEPS,
                "depths": DEMO_DEPTHS}
    for k, v in defaults.items():
        if out[k] is None:
            out[k] = v
    if out["eval_every"] is None:
        out["eval_every"] = max(1, out["steps"] // 60)  # 250 for 15,000: step 5,000 is one
    return out


def run(args: argparse.Namespace) -> int:
    from batchnorm.app.experiments import common

    with common.interrupt_at_step_boundaries():  # also while the data loads
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from batchnorm.app import data as data_mod
    from batchnorm.app.experiments import command, depth, fig1, runs

    for flag, value in (("--steps", args.steps), ("--depth-steps", args.depth_steps),
                        ("--eval-every", args.eval_every)):
        command.check_steps(value, flag)
    if args.resume:
        out = Path(args.resume)
        if args.out is not None and Path(args.out) != out:
            raise ValueError(f"--out {args.out} conflicts with --resume {out}")
        runs.prepare(out, resume=True, overwrite=args.overwrite)
        saved = runs.load_settings(out)
        if saved is None or saved.get("command") != "demo":
            raise FileNotFoundError(f"--resume {out}: no demo run there (no {runs.RUN_FILE} "
                                    "written by batchnorm demo)")
        runs.refuse_conflicts(settings(args), saved, "demo")
        opts = {k: saved[k] for k in settings(args)}
        opts["depths"] = tuple(opts["depths"])
    else:
        out = Path(args.out) if args.out else command.default_out("demo")
        runs.prepare(out, resume=False, overwrite=args.overwrite)
        opts = with_defaults(settings(args))
        runs.save_settings(out, {"command": "demo", **opts})
    source = opts["data"] or ("idx" if opts["mnist_dir"] else "mnist")
    try:
        data = data_mod.load(opts["mnist_dir"], opts["seed"], source)
    except data_mod.DataError as exc:
        if opts["data"]:  # asked for by name: no silent substitute
            raise
        print(f"full MNIST unavailable ({exc}); using the 5k subset instead")
        source = "mnist5k"
        data = data_mod.load(None, opts["seed"], source)
    print(f"batchnorm demo: {data.describe()}; writing to {out}")
    steps = opts["steps"]
    f_cfg = command.make_config(fig1, {"steps": steps, "seed": opts["seed"], "lr": opts["lr"],
                                       "init_std": opts["init_std"],
                                       "mnist_dir": opts["mnist_dir"],
                                       "eval_every": opts["eval_every"], "data": source,
                                       "checkpoint_every": max(1, steps // 4)})
    d_cfg = command.make_config(depth, {"steps": opts["depth_steps"], "seed": opts["seed"],
                                        "depths": opts["depths"], "mnist_dir": opts["mnist_dir"],
                                        "data": source})
    again = f"batchnorm demo --resume {out}"
    started = time.perf_counter()
    with command.rich_progress() as progress:
        results = []
        for module, cfg in ((fig1, f_cfg), (depth, d_cfg)):
            resume = bool(args.resume) and command.checkpoint_path(out, module.NAME).exists()
            results.append(command.execute(module, cfg, out, resume=resume, data=data,
                                           progress=progress, resume_command=again))
    f_res, d_res = results
    total = time.perf_counter() - started
    rows = fig1.summary(f_res) + depth.summary(d_res)
    rows.append(("demo total time", f"{total:.1f} s"))
    report = command.write_outputs(
        out, [(fig1, f_res), (depth, d_res)], title="batchnorm demo",
        preamble=f"{data.describe()}. Full runs: batchnorm experiment fig1 | depth | batch-size.",
    )
    command.print_summary(rows, f"batchnorm demo: {data.describe()}")
    print(f"results: {out / 'results.json'}\nreport:  {report}")
    return 0
