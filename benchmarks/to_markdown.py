"""Render a ``batchnorm bench --json`` result file as a Markdown table (for the README).

.venv/bin/python benchmarks/to_markdown.py benchmarks/results/bench-2threads.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

LABELS = {"forward": "train fwd", "forward_backward": "fwd+bwd", "eval": "eval fwd"}


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    names = [n for n in meta["contenders"] if n != "memcpy"]
    ours = names[0]
    head = ["case", "pass", *[f"{n} ms" for n in names], "memcpy ms"]
    head += [f"torch/{ours}", f"{ours}/memcpy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in data["cases"]:
        for i, (op, label) in enumerate(LABELS.items()):
            row = [f"`{case['name']}`" if i == 0 else "", label]
            row += [f"{case['times_ms'][n][op]:.3f}" for n in names]
            row.append(f"{case['memcpy_ms']:.3f}" if i == 0 else "")
            ratios = case["ratios"]
            torch_ratio = ratios.get(f"torch_over_{ours}", {}).get(op)
            row.append(f"{torch_ratio:.2f}x" if torch_ratio else "")
            row.append(f"{ratios[f'{ours}_over_memcpy'][op]:.2f}x")
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
    lines.append(
        f"First calls, all cases (numba: JIT compilation): {first}. {meta['dtype']}, "
        f"{meta['threads']} thread(s), OMP_WAIT_POLICY={meta['omp_wait_policy']}, "
        f"load average {load}, {meta['date']}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as fh:
            print(render(json.load(fh)))
