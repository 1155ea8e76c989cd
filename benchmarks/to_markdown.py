"""Render a ``batchnorm bench --json`` result file as a Markdown table (for the README).

.venv/bin/python benchmarks/to_markdown.py benchmarks/results/bench-functional.json

Files from before the bench ran each case in a new process (no ``ratio_spread``) render
too, without the spreads.
"""

from __future__ import annotations

import json
import sys
from typing import Any

LABELS = {"forward": "train fwd", "forward_backward": "fwd+bwd", "eval": "eval fwd"}


def ratio(case: dict[str, Any], key: str, op: str) -> str:
    value = case["ratios"].get(key, {}).get(op)
    if value is None:
        return ""
    spread = case.get("ratio_spread", {}).get(key, {}).get(op)
    return f"{value:.2f}x" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    names = [n for n in meta["contenders"] if n != "memcpy"]
    ours = names[0]
    others = [n for n in ("torch", "jax") if n in names[1:]]
    head = ["case", "pass", *[f"{n} ms" for n in names], "memcpy ms"]
    head += [f"{o}/{ours}" for o in others] + [f"{ours}/memcpy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in data["cases"]:
        for i, (op, label) in enumerate(LABELS.items()):
            row = [f"`{case['name']}`" if i == 0 else "", label]
            row += [f"{case['times_ms'][n][op]:.3f}" for n in names]
            row.append(f"{case['memcpy_ms']:.3f}" if i == 0 else "")
            row += [ratio(case, f"{o}_over_{ours}", op) for o in others]
            row.append(ratio(case, f"{ours}_over_memcpy", op))
            lines.append("| " + " | ".join(row) + " |")
    ref = meta.get("reference")
    if ref:
        lines.append("")
        lines.append(
            f"Seed reference (pure Python lists), `{ref['case']}`: forward "
            f"{ref['forward_ms']:.2f} ms, forward+backward {ref['forward_backward_ms']:.2f} ms."
        )
    first = ", ".join(f"{k} {v:.1f} s" for k, v in meta["first_call_s"].items())
    load = ", ".join(f"{v:.1f}" for v in meta["load_average"] if v is not None)
    level = f"{meta['level']} level ({meta['api']}); " if "level" in meta else ""
    lines.append(
        f"{level}first calls, all cases (numba: JIT compilation): {first}. {meta['dtype']}, "
        f"{meta['threads']} thread(s), OMP_WAIT_POLICY {meta['omp_wait_policy']}, "
        f"load average {load}, {meta['date']}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as fh:
            print(render(json.load(fh)))
