"""nnvitals: diagnose a network's training health from the numbers that matter, and learn why.

    import nnvitals
    report = nnvitals.check(model, inputs, targets)      # one batch
    with nnvitals.Monitor(model, every=10) as mon: ...   # a training run
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Finding", "Monitor", "Report", "check"]

if TYPE_CHECKING:
    from nnvitals.checks import Finding
    from nnvitals.doctor import Monitor, Report, check


def __getattr__(name: str) -> Any:
    # torch loads only when the doctor is used, so the lesson's commands start fast.
    if name in ("Monitor", "Report", "check"):
        from nnvitals import doctor

        return getattr(doctor, name)
    if name == "Finding":
        from nnvitals.checks import Finding

        return Finding
    raise AttributeError(f"module 'nnvitals' has no attribute {name!r}")
