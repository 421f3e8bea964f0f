"""The errors ``edgectl compress`` raises on purpose, each telling the user what to do next."""

from __future__ import annotations

from edgectl.errors import EdgectlError, UsageError


class CompressError(EdgectlError):
    """A compression step failed for a reason the user can act on."""


class BadInputError(CompressError, UsageError):
    """The model file, data file or an option cannot be used as given."""

    exit_code = 2


class ExportError(CompressError):
    """Neither the dynamo nor the TorchScript exporter could turn the torch model into ONNX."""


class ParityError(CompressError):
    """The exported ONNX model does not compute what the torch model computes."""


class PruneRefusedError(CompressError):
    """Pruning was asked for where it cannot help (no sparse kernels) or cannot be done safely."""


class NothingToPruneError(PruneRefusedError):
    """``--prune`` on a model with no channel a pruner may remove: the flag cannot work as given."""

    exit_code = 2


class QualityGateError(CompressError):
    """No candidate met the quality budget, so no artifact was written."""

    exit_code = 4

    def __init__(self, message: str, *, hint: str | None = None, trials: list[dict[str, object]]) -> None:
        super().__init__(message, hint=hint)
        self.trials = trials
        self.notes: list[str] = []  # what the run told the user about its inputs (an array renamed)


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (just the type for an empty message): a foreign exception in one line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}" if text else type(exc).__name__
