"""nnvitals: diagnose a network's training health from the numbers that matter, and learn why."""

from nnvitals.checks import Finding
from nnvitals.doctor import Monitor, Report, check

__version__ = "0.1.0"
__all__ = ["Finding", "Monitor", "Report", "check"]
