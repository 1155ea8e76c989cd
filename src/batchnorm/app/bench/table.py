"""The bench's printed table (rich), the same for the functional and drop-in levels."""

from __future__ import annotations

from typing import Any

from batchnorm.app.bench.timing import OP_LABELS, OPS


def ratio_text(res: dict[str, Any], key: str, op: str) -> str:
    """``1.85 (1.80-1.92)``: median per-round ratio and its 25th-75th percentiles."""
    if op not in res["ratios"].get(key, {}):
        return ""
    lo, hi = res["ratio_spread"][key][op]
    return f"{res['ratios'][key][op]:.2f} ({lo:.2f}-{hi:.2f})"


def print_table(results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = [n for n in meta["contenders"] if n != "memcpy"]
    ours = names[0] if names else ""
    keys = [f"{o}_over_{ours}" for o in ("torch", "jax") if o in names[1:]]
    load = ", ".join(f"{v:.1f}" for v in meta["load_average"] if v is not None)
    table = Table(
        title=f"batch norm, {meta['level']} level, {meta['dtype']}, {meta['threads']} "
        f"thread(s), median ms, OMP_WAIT_POLICY {meta['omp_wait_policy']}"
        + (f", load average {load}" if load else "")
        + f", malloc: {meta.get('malloc', 'unrecorded')}",
        caption=f"{meta['api']}. Ratios: median of per-round ratios (25th-75th percentile); "
        f"> 1 under X/{ours} means ours is faster; {ours}/memcpy is the cost over a copy of x. "
        f"faults: minor page faults per call (median), contenders in column order. "
        f"{meta['processes']}.",
    )
    table.add_column("case")
    table.add_column("pass")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("memcpy", justify="right")
    for key in keys:
        table.add_column(key.replace("_over_", "/"), justify="right")
    table.add_column(f"{ours}/memcpy", justify="right")
    table.add_column("faults", justify="right")
    for res in results:
        for i, op in enumerate(OPS):
            name = res["name"] + (f" [{res['route']}]" if res.get("route") else "")
            row = [name if i == 0 else "", OP_LABELS[op]]
            row += [f"{res['times_ms'][n][op]:.3f}" for n in names]
            row.append(f"{res['memcpy_ms']:.3f}" if i == 0 else "")
            row += [ratio_text(res, key, op) for key in keys]
            row.append(ratio_text(res, f"{ours}_over_memcpy", op))
            faults = res.get("page_faults", {})
            row.append(" / ".join(f"{faults[n][op]:.0f}" for n in names if op in faults.get(n, {})))
            table.add_row(*row, end_section=i == len(OPS) - 1)
    console = Console(width=max(Console().width, 140))
    console.print(table)
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in meta["first_call_s"].items())
    console.print(f"first calls in each new process (numba: JIT compilation), all cases: {parts}")
    ref = meta.get("reference")
    if ref:
        console.print(
            f"seed reference (pure Python lists), {ref['case']}: forward "
            f"{ref['forward_ms']:.2f} ms, forward+backward {ref['forward_backward_ms']:.2f} ms"
        )
