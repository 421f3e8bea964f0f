"""Fixtures the security tests share with the control plane's (a throwaway PostgreSQL schema)
and the agent's (signed artifacts and real agents, for the attacks on the serving path)."""

from __future__ import annotations

from tests.agent.conftest import bundles, make_agent, trust_file
from tests.control_plane.conftest import postgres_url

__all__ = ["bundles", "make_agent", "postgres_url", "trust_file"]
