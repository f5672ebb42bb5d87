"""TensorBoard output for a Monitor: per-layer scalars and histograms on sampled steps, findings as text.

Needs the `tensorboard` package (`pip install nnvitals[tensorboard]`). The histograms are the doctor's
own fixed-range bins, written as they are (`add_histogram_raw`), so TensorBoard shows exactly what the
doctor measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from nnvitals.checks import Finding
    from nnvitals.probes import LayerStats, PassStats


def open_writer(target: Any) -> Any:
    """A SummaryWriter as given, or a new one writing into the folder `target`."""
    if isinstance(target, str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise ImportError("writing to TensorBoard needs the tensorboard package: "
                              "pip install 'nnvitals[tensorboard]'") from e
        return SummaryWriter(log_dir=str(target))
    for method in ("add_scalar", "add_histogram_raw", "add_text"):
        if not callable(getattr(target, method, None)):
            raise TypeError(f"tensorboard must be a folder or a SummaryWriter; {type(target).__name__} has no {method}")
    return target


def write_step(writer: Any, step: int, stats: PassStats, loss: float | None) -> None:
    """The scalars and histograms of one sampled step."""
    if loss is not None:
        writer.add_scalar("loss", loss, step)
    for lay in stats.layers:
        tag = f"layers/{lay.name}"
        writer.add_scalar(f"{tag}/std", lay.std, step)
        if lay.saturated is not None:
            writer.add_scalar(f"{tag}/saturated", lay.saturated, step)
        if lay.inactive is not None:
            writer.add_scalar(f"{tag}/inactive", lay.inactive, step)
        if lay.grad_std is not None:
            writer.add_scalar(f"{tag}/grad_std", lay.grad_std, step)
        if lay.hist:
            _histogram(writer, f"{tag}/activations", lay, step)
    for p in stats.params:
        if p.update_ratio is not None and np.isfinite(p.update_ratio):
            writer.add_scalar(f"update_ratio/{p.name}", p.update_ratio, step)
        if p.grad_to_weight is not None:
            writer.add_scalar(f"grad_to_weight/{p.name}", p.grad_to_weight, step)


def _histogram(writer: Any, tag: str, lay: LayerStats, step: int) -> None:
    lo, hi = lay.hist_range
    counts = np.asarray(lay.hist, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return
    edges = np.linspace(lo, hi, len(counts) + 1)
    n = float(total)
    # sum and sum of squares from the layer's mean and std (of all its values, in range or not)
    writer.add_histogram_raw(tag, min=lo, max=hi, num=n, sum=lay.mean * n,
                             sum_squares=(lay.std ** 2 + lay.mean ** 2) * n, bucket_limits=edges[1:].tolist(),
                             bucket_counts=counts.tolist(), global_step=step)


def write_findings(writer: Any, step: int, findings: list[Finding]) -> None:
    """The findings as one markdown table (TensorBoard's Text tab)."""
    if findings:
        rows = "\n".join(f"| {f.severity} | `{f.code}` | {f.where} | {f.message} | {f.fix} |" for f in findings)
        text = "| severity | code | where | finding | fix |\n|---|---|---|---|---|\n" + rows
    else:
        text = "No findings: the numbers look healthy."
    writer.add_text("nnvitals/findings", text, step)
    writer.flush()
