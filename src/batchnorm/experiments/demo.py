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
    from batchnorm.experiments.command import add_common_options

    add_common_options(parser, steps_help=f"fig1 training steps (default {DEMO_STEPS:,})")
    parser.set_defaults(steps=DEMO_STEPS)
    parser.add_argument("--depth-steps", type=int, default=DEMO_DEPTH_STEPS, metavar="N",
                        help=f"training steps per net in the depth sweep ({DEMO_DEPTH_STEPS})")
    parser.add_argument("--depths", type=_ints, default=DEMO_DEPTHS, metavar="D,D,...",
                        help="depths of the sweep (default " + ",".join(map(str, DEMO_DEPTHS))
                             + ")")
    parser.add_argument("--eval-every", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from batchnorm import data as data_mod
    from batchnorm.experiments import command, depth, fig1

    out = Path(args.out) if args.out else command.default_out("demo")
    seed = 0 if args.seed is None else args.seed
    source = args.data or ("idx" if args.mnist_dir else "mnist")
    try:
        data = data_mod.load(args.mnist_dir, seed, source)
    except data_mod.DataError as exc:
        if args.data:  # asked for by name: no silent substitute
            raise
        print(f"full MNIST unavailable ({exc}); using the 5k subset instead")
        source = "mnist5k"
        data = data_mod.load(None, seed, source)
    print(f"batchnorm demo: {data.describe()}; writing to {out}")
    steps = args.steps
    eval_every = args.eval_every or max(1, steps // 60)  # 250 for 15,000: step 5,000 is one
    f_cfg = command.make_config(fig1, {"steps": steps, "seed": seed, "lr": args.lr,
                                       "init_std": args.init_std, "mnist_dir": args.mnist_dir,
                                       "data": source, "eval_every": eval_every,
                                       "checkpoint_every": max(1, steps // 4)})
    d_cfg = command.make_config(depth, {"steps": args.depth_steps, "seed": seed,
                                        "depths": args.depths, "mnist_dir": args.mnist_dir,
                                        "data": source})
    started = time.perf_counter()
    with command.rich_progress() as progress:
        f_res = command.execute(fig1, f_cfg, out, data=data, progress=progress)
        d_res = command.execute(depth, d_cfg, out, data=data, progress=progress)
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
