"""End to end on CPU: a training step of native models against the same models converted.

A small conv net (two Conv-BN-ReLU, batch 32 at 32x32) and ResNet-18 (written out here:
torchvision does not install beside this torch build; batch 16 at 64x64, and with ``--nets``
at 224x224), each in NCHW and channels_last. Native and converted
(``batchnorm.torch.convert_model`` on a copy, same weights) alternate step by step
(zero_grad, forward, cross-entropy, backward, SGD step) after warm-up; medians. The
default environment: no OpenMP variable is set, PyTorch's own thread count.

    .venv/bin/python benchmarks/e2e_cpu.py [--rounds 10] [--nets NAME ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

import batchnorm.torch as bt


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


def measure(name: str, layout: str, rounds: int) -> dict[str, float]:
    build, shape = NETS[name]
    torch.manual_seed(0)
    native = build()
    converted = bt.convert_model(copy.deepcopy(native))
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
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(rounds + 2):
        for label, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= 2:
                times[label].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS)[:2],
                        help="default: the two small ones (ResNet-18 at 224x224 takes minutes)")
    args = parser.parse_args()
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median ms per step")
    for name in args.nets:
        for layout in ("contiguous", "channels_last"):
            ms = measure(name, layout, args.rounds)
            ratio = ms["native"] / ms["converted"]
            rows.append({"net": name, "layout": layout, **ms, "native/converted": ratio})
            print(f"{name:<15} {layout:<13} native {ms['native']:8.1f}  converted "
                  f"{ms['converted']:8.1f}  native/converted {ratio:5.2f}x")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            meta = {"torch": torch.__version__, "threads": torch.get_num_threads()}
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
