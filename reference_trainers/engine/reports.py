"""What a recipe writes when its runs are done: ``results.json``, ``results.md``, ``results.png``.

:func:`summarise` (mean and sd over seeds), :func:`markdown_table`, :func:`write_reports`, and
:func:`environment` (versions and hardware recorded with the results).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import kdloss
from reference_trainers.engine import atomic
from reference_trainers.engine.atomic import json_bytes
from reference_trainers.engine.context import Context, RunResult
from reference_trainers.engine.signals import STOP

__all__ = ["environment", "markdown_table", "summarise", "write_reports"]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(ctx: Context) -> dict[str, Any]:
    """Versions and hardware to record with the results."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kdloss": kdloss.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }
    with contextlib.suppress(ImportError):
        import torchvision

        env["torchvision"] = torchvision.__version__
    if ctx.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(ctx.device)
        env["cuda"] = torch.version.cuda
    return env


def _mean_sd(xs: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    # one seed has no spread: None (shown as 'n/a'), not a misleading 0
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return m, sd


def summarise(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order): mean and sample standard deviation over seeds.

    Keys: ``method``, ``seeds``, ``n``, and ``<metric>_mean`` / ``<metric>_sd`` for ``val_last``,
    ``val_best``, ``test_selected``, ``test_last``, ``train_time_s``, ``images_per_s``.
    """
    rows: list[dict[str, Any]] = []
    for method in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == method]
        row: dict[str, Any] = {"method": method, "seeds": [r.seed for r in rs], "n": len(rs)}
        for key in ("val_last", "val_best", "test_selected", "test_last", "train_time_s", "images_per_s"):
            row[f"{key}_mean"], row[f"{key}_sd"] = _mean_sd([getattr(r, key) for r in rs])
        rows.append(row)
    return rows


def _pct(m: float | None, sd: float | None) -> str:
    if m is None:
        return "—"
    return f"{100 * m:.2f}" if sd is None else f"{100 * m:.2f} ± {100 * sd:.2f}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The results table in Markdown (accuracies in %, mean ± sd over seeds)."""
    head = (
        "| method | seeds | val acc, last epoch | val acc, best epoch | test acc (selected on val) "
        "| test acc, last epoch | train time (s) | images/s |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['method']} | {', '.join(map(str, r['seeds']))} | {_pct(r['val_last_mean'], r['val_last_sd'])} "
            f"| {_pct(r['val_best_mean'], r['val_best_sd'])} | {_pct(r['test_selected_mean'], r['test_selected_sd'])} "
            f"| {_pct(r['test_last_mean'], r['test_last_sd'])} | {r['train_time_s_mean']:.1f} "
            f"| {r['images_per_s_mean']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def _accuracy_panel(ax: Any, results: Sequence[RunResult], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Test accuracy per method as points: every seed's value, the mean, and ± sd only when there is
    a spread (two seeds or more). Points, not bars, so a y axis that does not start at 0 cannot
    exaggerate the differences. Returns the methods in order."""
    names = [str(r["method"]) for r in rows]
    for i, r in enumerate(rows):
        values = [100 * x.test_selected for x in results if x.method == r["method"]]
        ax.plot([i] * len(values), values, linestyle="none", marker=".", color="0.55", zorder=2)
        mean, sd = r["test_selected_mean"], r["test_selected_sd"]
        if mean is None:
            continue
        yerr = None if sd is None else 100 * sd
        ax.errorbar([i], [100 * mean], yerr=yerr, fmt="o", color="tab:blue", capsize=5, zorder=3)
        label = f"{100 * mean:.1f}" if sd is None else f"{100 * mean:.1f} ± {100 * sd:.1f}"
        ax.annotate(label, (i, 100 * mean), xytext=(8, 0), textcoords="offset points", va="center", fontsize="small")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_xlim(-0.5, len(names) - 0.5 + 0.6)
    spread = any(r["test_selected_sd"] is not None for r in rows)
    ax.set_ylabel("test accuracy (%), model selected on val")
    ax.set_title("test accuracy per method: " + ("mean ± sd over seeds, dots: seeds" if spread else "one seed each"))
    return names


def _plot_png(results: Sequence[RunResult], rows: Sequence[Mapping[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = _accuracy_panel(ax1, results, rows)
    for i, method in enumerate(names):
        color = f"C{i % 10}"
        for j, r in enumerate(x for x in results if x.method == method):
            xs = [h["epoch"] for h in r.history]
            ys = [100 * h["val_acc"] if h["val_acc"] is not None else float("nan") for h in r.history]
            if all(math.isnan(y) for y in ys):
                xs = [h["epoch"] for h in r.history if h["test_acc"] is not None]
                ys = [100 * h["test_acc"] for h in r.history if h["test_acc"] is not None]
            ax2.plot(xs, ys, color=color, alpha=0.8, marker=".", label=method if j == 0 else None)
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation accuracy (%)")
    ax2.set_title("training curves")
    ax2.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_reports(
    out_dir: str | os.PathLike[str],
    results: Sequence[RunResult],
    meta: Mapping[str, Any],
    *,
    plot: bool = True,
    ctx: Context | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (``plot``) ``results.png`` atomically; return their paths.

    ``meta`` is recorded as is in the JSON (recipe, options, seeds, data, environment...). A
    SIGINT / SIGTERM while they are written stops before the next file (:class:`StopRequested`;
    ``ctx``'s ``handle_signals`` and world size say whether signals are handled, as in
    :func:`train_run`); ``--resume`` then writes them all from the finished checkpoints.

    Raises:
        OutputError: a report cannot be written (a full disk, a read-only directory...).
        StopRequested: a stop signal arrived.
    """
    handle = ctx.config.handle_signals and not ctx.distributed if ctx is not None else True
    held = STOP.enter(handle)
    try:
        where = "while writing the reports (every run is finished and checkpointed)"
        STOP.check(where)
        out = Path(out_dir)
        rows = summarise(results)
        table = markdown_table(rows)
        title = str(meta.get("recipe", "results"))
        doc = {"meta": dict(meta), "summary": rows, "runs": [r.to_json() for r in results]}
        paths = {"json": out / "results.json", "md": out / "results.md"}
        md = f"# {title}\n\n{meta.get('data', '')}\n\n{table}"
        png = _plot_png(results, rows, title) if plot else None
        files = [(paths["json"], json_bytes(doc)), (paths["md"], md.encode())]
        if png is not None:
            paths["png"] = out / "results.png"
            files.append((paths["png"], png))
        for path, data in files:
            STOP.check(where)
            atomic.atomic_write_bytes(path, data)
        return paths
    finally:
        if held:
            STOP.exit()
