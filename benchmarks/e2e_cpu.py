"""End to end on CPU: a training step of native models against the same models converted.

A small conv net (two Conv-BN-ReLU, batch 32 at 32x32) and ResNet-18 (written out here:
torchvision does not install beside this torch build; batch 16 at 64x64, and with ``--nets``
at 224x224), each in NCHW and channels_last. Native and converted
(``batchnorm.torch.convert_model`` on a copy, same weights) alternate step by step
(zero_grad, forward, cross-entropy, backward, SGD step), in an order shuffled every round,
after warm-up; medians, and the
ratio native/converted of each round's pair of steps as median with its 25th-75th
percentiles (the spread says what noise is). The default environment: no OpenMP variable
is set, PyTorch's own thread count.

    .venv/bin/python benchmarks/e2e_cpu.py [--rounds 10] [--nets NAME ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from torch import nn

import batchnorm.torch as bt
from batchnorm.app.bench.timing import alternated


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def resnet18(classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(), nn.MaxPool2d(3, 2, 1)]  # fmt: skip
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def small_net(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes),
    )  # fmt: skip


NETS = {"small conv net": (small_net, (32, 3, 32, 32)), "ResNet-18": (resnet18, (16, 3, 64, 64)),
        "ResNet-18 224x224": (resnet18, (16, 3, 224, 224))}


def quartiles(values: list[float]) -> list[float]:
    """[25th, 50th, 75th] percentiles."""
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[1], q[2]]


def measure(name: str, layout: str, rounds: int, control: bool = False) -> dict[str, object]:
    """Median step times and per-round ratios; ``control``: the "converted" model is an
    unconverted copy of the native one (an A/A run: the ratios' spread is the noise)."""
    build, shape = NETS[name]
    torch.manual_seed(0)
    base = build()
    # both sides are copies: in A/A runs a copy against the model it was copied from was up
    # to 12% slower (memory placement), which would bias a converted copy the same way
    native, converted = copy.deepcopy(base), copy.deepcopy(base)
    if not control:
        converted = bt.convert_model(converted)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (shape[0],))
    steps = {}
    for label, model in (("native", native), ("converted", converted)):
        model.to(memory_format=fmt).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            opt.step()

        steps[label] = step
    times = alternated(steps, rounds)  # shuffled: a fixed order favoured one side, up to 4%
    ratios = [n / c for n, c in zip(times["native"], times["converted"], strict=True)]
    out: dict[str, object] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    out["round_ratio_quartiles"] = quartiles(ratios)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--control", action="store_true",
                        help="A/A: time the native model against an unconverted copy of itself")
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS)[:2],
                        help="default: the two small ones (ResNet-18 at 224x224 takes minutes)")
    args = parser.parse_args()
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median ms per step"
          + (": A/A control, 'converted' is an unconverted copy" if args.control else ""))
    for name in args.nets:
        for layout in ("contiguous", "channels_last"):
            ms = measure(name, layout, args.rounds, args.control)
            native, converted = float(ms["native"]), float(ms["converted"])  # type: ignore[arg-type]
            ratio = native / converted
            lo, mid, hi = ms["round_ratio_quartiles"]  # type: ignore[misc]
            rows.append({"net": name, "layout": layout, **ms, "native/converted": ratio})
            print(f"{name:<17} {layout:<13} native {native:8.1f}  converted {converted:8.1f}  "
                  f"native/converted {ratio:5.2f}x  per round {mid:.2f} ({lo:.2f}-{hi:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "control (A/A, nothing converted)": args.control}
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
