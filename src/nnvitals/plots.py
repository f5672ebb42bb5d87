"""Pictures of the doctor's statistics: histograms, saturation maps, update-ratio history.

Every function draws from a Report (statistics already on the host); nothing here measures anything.
Figures use matplotlib's object API, so importing this module never changes a notebook's backend.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from nnvitals.checks import UPDATE_RATIO_HIGH, UPDATE_RATIO_LOW, UPDATE_RATIO_TARGET
from nnvitals.probes import ACTIVATIONS, BOUNDED, GRAD_HIST_SIGMAS, LayerStats

if TYPE_CHECKING:
    from nnvitals.doctor import Report

MAX_MAPS = 4  # saturation maps drawn side by side


def _activations(report: Report) -> list[LayerStats]:
    return [lay for lay in report.layers if lay.kind in ACTIVATIONS]


def _legend_label(lay: LayerStats) -> str:
    sat = f", saturated {100 * lay.saturated:.1f}%" if lay.saturated is not None else ""
    return f"{lay.name}: mean {lay.mean:+.2f}, std {lay.std:.2f}{sat}"


def activation_histograms(report: Report) -> Figure | None:
    layers = _activations(report)
    if not layers:
        return None
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.add_subplot()
    for lay in layers:
        lo, hi = lay.hist_range
        counts = np.asarray(lay.hist)
        width = (hi - lo) / len(counts)
        centres = lo + width * (np.arange(len(counts)) + 0.5)
        ax.plot(centres, counts / max(counts.sum() * width, 1e-12), label=_legend_label(lay))
    ax.set_title("activation distribution per layer (mass at the ends = saturated)")
    ax.set_xlabel("output value")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    return fig


def gradient_histograms(report: Report) -> Figure | None:
    layers = [lay for lay in _activations(report) if lay.grad_hist is not None and lay.grad_std]
    if not layers:
        return None
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.add_subplot()
    for lay in layers:
        assert lay.grad_hist is not None and lay.grad_std is not None
        counts = np.asarray(lay.grad_hist)
        z_width = 2 * GRAD_HIST_SIGMAS / len(counts)
        centres = (-GRAD_HIST_SIGMAS + z_width * (np.arange(len(counts)) + 0.5)) * lay.grad_std
        density = counts / max(counts.sum() * z_width * lay.grad_std, 1e-30)
        ax.plot(centres, density, label=f"{lay.name}: mean {lay.grad_mean:+.2e}, std {lay.grad_std:.2e}")
    ax.set_title("gradient distribution at each activation's output")
    ax.set_xlabel("gradient value")
    ax.set_ylabel("density")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    ax.legend(fontsize="small")
    return fig


def saturation_maps(report: Report) -> Figure | None:
    layers = [lay for lay in report.layers if lay.kind in BOUNDED and lay.sat_map is not None][:MAX_MAPS]
    if not layers:
        return None
    fig = Figure(figsize=(5 * len(layers), 3.2), layout="constrained")
    for i, lay in enumerate(layers):
        assert lay.sat_map is not None
        ax = fig.add_subplot(1, len(layers), i + 1)
        ax.imshow(lay.sat_map, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        dead = f", {lay.dead} dead" if lay.dead is not None else ""
        ax.set_title(f"{lay.name}: white = |t| > 0.99{dead}", fontsize="small")
        ax.set_xlabel("unit")
        ax.set_ylabel("example")
    return fig


def update_ratio_history(report: Report) -> Figure | None:
    rows = [r for r in report.history if r["params"]]
    names = [p.name for p in report.params if len(p.shape) >= 2]
    if len(rows) < 2 or not names:
        return None
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.add_subplot()
    steps = [r["step"] for r in rows]
    for name in names:
        values = [r["params"].get(name, {}).get("update_ratio") for r in rows]
        ax.plot(steps, [np.nan if v is None else v for v in values], label=name)
    ax.axhline(UPDATE_RATIO_TARGET, color="k", linestyle="--", linewidth=1, label="rule of thumb (-3)")
    ax.axhspan(UPDATE_RATIO_LOW, UPDATE_RATIO_HIGH, color="green", alpha=0.05)
    ax.set_title("update-to-data ratio per weight: log10(std(update) / std(weight))")
    ax.set_xlabel("step")
    ax.set_ylabel("log10 ratio")
    ax.legend(fontsize="small")
    return fig


FIGURES = {
    "activations": activation_histograms,
    "gradients": gradient_histograms,
    "saturation": saturation_maps,
    "update_ratio": update_ratio_history,
}


def render_all(report: Report) -> list[tuple[str, bytes]]:
    """(name, PNG bytes) for each picture the report has data for."""
    out = []
    for name, draw in FIGURES.items():
        fig = draw(report)
        if fig is not None:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            out.append((name, buf.getvalue()))
    return out


def save_all(report: Report, directory: Path) -> list[Path]:
    """Write each picture as DIRECTORY/NAME.png (each via a temporary file, then renamed)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, png in render_all(report):
        path = directory / f"{name}.png"
        tmp = directory / f".{name}.{os.getpid()}.png.tmp"  # an ordinary file, permissions by the umask
        try:
            tmp.write_bytes(png)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paths.append(path)
    return paths
