"""The local lesson page: `nnvitals serve`. create_app builds it (tests build their own)."""

from nnvitals.web.app import create_app

__all__ = ["create_app"]
