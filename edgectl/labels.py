"""Device labels and selectors: the one parser and matcher the CLI, the agent and the control plane share.

Labels are ``k=v[,k=v]``; a selector is the same text where ``id=NAME`` names a device instead of a
label. That is why ``id`` is reserved as a label key everywhere: a label ``id`` could never be
selected, so it is refused where it is written rather than lost or ignored later.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgectl.errors import UsageError

SELECTOR_ID_KEY = "id"
_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62})$")
_MAX_VALUE = 256
_LABELS_HINT = "write k=v[,k=v], e.g. site=lab,gpu=orin"


class LabelError(UsageError):
    """A label or selector that cannot be used as written."""


def _pairs(text: str, what: str, hint: str) -> Iterator[tuple[str, str]]:
    """``k=v`` pairs of a comma-separated text, stripped; empty parts are skipped."""
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise LabelError(f"{what} {part!r} is not key=value", hint=hint)
        yield key.strip(), value.strip()


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` as a dict if every key and value is usable in a selector, else LabelError."""
    for key, value in labels.items():
        if key == SELECTOR_ID_KEY:
            raise LabelError(
                "label key 'id' is reserved: in a selector, id=NAME names a device",
                hint="the device id is set by the agent's --device-id; pick another key, e.g. camera=cam-9",
            )
        if not _KEY_RE.fullmatch(key):
            raise LabelError(
                f"label key {key!r} is not allowed", hint="use up to 63 letters, digits, '.', '_', '/', '-'"
            )
        if not value or "," in value or "=" in value or len(value) > _MAX_VALUE:
            raise LabelError(
                f"label {key}={value!r}: a value must be 1..{_MAX_VALUE} chars without ',' or '='"
            )
    return dict(labels)


def parse_labels(text: str | None) -> dict[str, str]:
    """``site=lab,gpu=orin`` -> ``{"site": "lab", "gpu": "orin"}`` (empty for None); LabelError if unusable."""
    labels: dict[str, str] = {}
    for key, value in _pairs(text or "", "label", _LABELS_HINT):
        labels[key] = value
    return check_labels(labels)


def format_labels(labels: Mapping[str, str]) -> str:
    """``{"site": "lab", "gpu": "orin"}`` -> ``gpu=orin,site=lab``: sorted, and what parse_labels reads back."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


@dataclass(frozen=True)
class Selector:
    """Devices to target: every label must match (AND), or the id is listed (OR)."""

    labels: dict[str, str] = field(default_factory=dict)
    device_ids: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """True when the selector names neither labels nor devices."""
        return not self.labels and not self.device_ids

    def matches(self, device_id: str, labels: Mapping[str, str]) -> bool:
        """True if ``device_id`` is listed, or the device carries every label of the selector."""
        if device_id in self.device_ids:
            return True
        return bool(self.labels) and all(labels.get(k) == v for k, v in self.labels.items())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as the rollout store keeps it."""
        return {"labels": dict(sorted(self.labels.items())), "device_ids": list(self.device_ids)}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Selector:
        """The inverse of :meth:`to_dict`."""
        return cls(dict(obj.get("labels", {})), tuple(obj.get("device_ids", [])))

    def __str__(self) -> str:
        return ",".join(filter(None, [format_labels(self.labels), *(f"id={d}" for d in self.device_ids)]))


def parse_selector(text: str) -> Selector:
    """``site=lab,gpu=orin`` or ``id=cam-1,id=cam-2`` (mixable) into a Selector; LabelError if unusable."""
    hint = "write e.g. --to site=lab,ring=canary or --to id=cam-07"
    labels: dict[str, str] = {}
    ids: list[str] = []
    for key, value in _pairs(text, "selector part", hint):
        if key == SELECTOR_ID_KEY:
            ids.append(value)
        else:
            labels[key] = value
    selector = Selector(labels, tuple(ids))
    if selector.empty:
        raise LabelError("the selector is empty", hint="name labels (site=lab) or devices (id=cam-07)")
    return selector
