"""nnvitals: diagnose a network's training health from the numbers that matter, and learn why."""

__version__ = "0.1.0"
