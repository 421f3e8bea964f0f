"""The one label and selector parser: the rules, and the same answer through the agent's config and the sim CLI.

The control plane's use (devices enroll/label/ls against a live server) is in
tests/control_plane/test_cp_cli.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgectl.agent.config import load_config
from edgectl.agent.errors import ConfigError
from edgectl.cli import app as APP
from edgectl.labels import LabelError, Selector, check_labels, format_labels, parse_labels, parse_selector

SITE_LAB_ID = "site=lab,id=cam-9"


def test_labels_parse_and_strip_and_format_back() -> None:
    labels = parse_labels(" site = lab , gpu=orin,, ")
    assert labels == {"site": "lab", "gpu": "orin"}
    assert format_labels(labels) == "gpu=orin,site=lab" and parse_labels(format_labels(labels)) == labels
    assert parse_labels(None) == {} and parse_labels("") == {} and format_labels({}) == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SITE_LAB_ID, "'id' is reserved"),
        ("site", "is not key=value"),
        ("site=", "is not key=value"),
        ("=lab", "is not key=value"),
        ("-site=lab", "is not allowed"),
        ("site=" + "x" * 257, "1..256 chars"),
    ],
)
def test_unusable_labels_are_refused(text: str, message: str) -> None:
    with pytest.raises(LabelError, match=message):
        parse_labels(text)


def test_check_labels_applies_the_same_rule_to_a_mapping() -> None:
    assert check_labels({"site": "lab"}) == {"site": "lab"}
    for bad in ({"id": "cam-9"}, {"site": "a,b"}, {"site": "a=b"}, {"bad key": "x"}):
        with pytest.raises(LabelError):
            check_labels(bad)


def test_selector_site_lab_id_cam_9_is_labels_or_ids() -> None:
    selector = parse_selector(SITE_LAB_ID)
    assert selector == Selector({"site": "lab"}, ("cam-9",))
    assert selector.matches("cam-9", {})  # listed by id, whatever its labels
    assert selector.matches("cam-1", {"site": "lab", "gpu": "orin"})
    assert not selector.matches("cam-1", {"site": "dock"})
    assert not selector.matches("cam-1", {"id": "cam-9"})  # id never matches as a label
    assert str(selector) == SITE_LAB_ID
    assert str(parse_selector("id=cam-9")) == "id=cam-9" and str(parse_selector("b=2,a=1")) == "a=1,b=2"
    assert Selector.from_dict(selector.to_dict()) == selector


@pytest.mark.parametrize(("text", "message"), [("", "empty"), (",", "empty"), ("site", "key=value")])
def test_bad_selectors_are_refused(text: str, message: str) -> None:
    with pytest.raises(LabelError, match=message):
        parse_selector(text)


def test_agent_config_refuses_the_reserved_id_label_from_flag_and_file(tmp_path: Path) -> None:
    ok = load_config(overrides={"device_id": "cam-9", "labels": "site=lab,camera=cam-9"})
    assert ok.labels == {"site": "lab", "camera": "cam-9"}
    with pytest.raises(ConfigError, match="'id' is reserved"):
        load_config(overrides={"device_id": "cam-9", "labels": SITE_LAB_ID})
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("device_id: cam-9\nlabels:\n  site: lab\n  id: cam-9\n")
    with pytest.raises(ConfigError, match="'id' is reserved"):
        load_config(cfg)
    cfg.write_text("device_id: cam-9\nlabels:\n  site: lab\n")
    assert load_config(cfg).labels == {"site": "lab"}


def test_sim_cli_refuses_the_reserved_id_label_before_starting_anything() -> None:
    result = CliRunner().invoke(APP, ["sim", "run", "--devices", "1", "--labels", SITE_LAB_ID])
    assert isinstance(result.exception, LabelError) and "'id' is reserved" in str(result.exception)
