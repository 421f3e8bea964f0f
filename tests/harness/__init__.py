"""Fixtures' building blocks: real servers on free ports, never mocks of what a test checks."""
