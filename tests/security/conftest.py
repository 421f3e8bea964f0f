"""Fixtures the security tests share with the control plane's: a throwaway PostgreSQL schema."""

from __future__ import annotations

from tests.control_plane.conftest import postgres_url

__all__ = ["postgres_url"]
