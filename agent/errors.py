"""The agent's named failures; the V2 servicer maps them to gRPC status codes in one place.

Each message says what was expected or what to do next, so a client (or the reported state)
shows one actionable line.
"""

from __future__ import annotations

from edgectl.errors import EdgectlError


class AgentError(EdgectlError):
    """Root of every failure the agent raises on purpose."""


class ConfigError(AgentError):
    """A flag, environment variable or config file value that cannot work."""

    exit_code = 2


class InvalidInputError(AgentError):
    """An inference request whose inputs do not match the model's signature (INVALID_ARGUMENT)."""


class ModelNotFoundError(AgentError):
    """No model of that name is served here (NOT_FOUND)."""


class ModelUnavailableError(AgentError):
    """The model exists but cannot serve right now: loading, failing, or overloaded (UNAVAILABLE)."""


class NotServedError(AgentError):
    """A Triton extension the agent does not serve, such as shared memory or model control (UNIMPLEMENTED)."""


class ModelLoadError(AgentError):
    """onnxruntime could not create a session for the model on any execution provider."""


class InferenceError(AgentError):
    """The model failed while running a request (INTERNAL)."""


class BatcherClosedError(AgentError):
    """The batcher was closed by a swap; the caller retries on the new model."""


class FetchError(AgentError):
    """An artifact could not be fetched (network, server, disk); retried with backoff."""


class UrlsNotOfferedError(FetchError):
    """The control plane hands out no chunk URLs (a local-disk blob store): use Download."""


class InsufficientSpaceError(FetchError):
    """The data dir lacks the free space the download needs."""


class RefusedError(AgentError):
    """An artifact the agent will not run: unsigned, untrusted, too old, unfit or failing its smoke test.

    Refusals are final for that digest: the agent reports them and does not retry.
    """


class SmokeTestError(RefusedError):
    """The model's outputs on its golden input differ from the golden outputs."""


class BurstUnavailableError(AgentError):
    """The burst endpoint is not configured, its circuit is open, or the call failed."""


class BurstBudgetSpentError(BurstUnavailableError):
    """This period's burst budget is spent and the agent serves locally instead (the router falls back)."""


class BudgetExhaustedError(AgentError):
    """This period's burst budget is spent and the agent is set to refuse what would burst (RESOURCE_EXHAUSTED)."""
