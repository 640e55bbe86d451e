"""The RPN's test-time proposal settings that `medrpn predict` can change for one run.

A checkpoint carries the settings it was trained and validated with (``rpn.post_nms_top_n_test``,
``rpn.nms_thresh``, ``rpn.test_flips``). A candidate generator feeding a second stage of the
user's own is tuned for recall, which wants more, and more overlapping, proposals than the
detector was trained to score; so predict takes them from the command line, and the JSON outputs
record which were used (`describe_proposal_settings`).
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any

from medrpn.errors import ConfigError
from medrpn.model.rpn import RPNConfig

# the RPN settings predict can change: RPNConfig field -> name in the JSON and on the command line
CHANGEABLE_PROPOSAL_SETTINGS = {
    "post_nms_top_n_test": ("proposals_per_image", "--proposals-per-image"),
    "nms_thresh": ("nms_thresh", "--proposal-nms"),
    "test_flips": ("test_flips", "--test-flips"),
}


def proposal_changes(
    proposals_per_image: int | None = None, proposal_nms: float | None = None, test_flips: list[str] | None = None
) -> dict[str, Any]:
    """The given test-time proposal settings as RPNConfig fields (None: keep the checkpoint's).

    Raises:
        ConfigError: a value that cannot work, named by its command-line flag.
    """
    changes: dict[str, Any] = {}
    if proposals_per_image is not None:
        if int(proposals_per_image) != proposals_per_image or proposals_per_image < 1:
            raise ConfigError(f"--proposals-per-image must be a whole number of at least 1, got {proposals_per_image}")
        changes["post_nms_top_n_test"] = int(proposals_per_image)
    if proposal_nms is not None:
        if not 0 < proposal_nms <= 1:
            raise ConfigError(f"--proposal-nms must be an IoU in (0, 1] (1: no suppression), got {proposal_nms}")
        changes["nms_thresh"] = float(proposal_nms)
    if test_flips is not None:
        changes["test_flips"] = list(test_flips)
    return changes


def describe_proposal_settings(rpn: RPNConfig, changed: dict[str, Any]) -> dict[str, Any]:
    """The RPN's test-time settings as recorded in findings.json and proposals.json."""
    return {
        "proposals_per_image": int(rpn.post_nms_top_n_test),
        "pre_nms_per_level": int(rpn.pre_nms_top_n_test),
        "nms_thresh": float(rpn.nms_thresh),
        "test_flips": list(rpn.test_flips),
        "changed": [CHANGEABLE_PROPOSAL_SETTINGS[key][0] for key in changed],
    }


def rpn_settings(hyper_parameters: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's RPN settings (its ``hyper_parameters["rpn"]``) as a dict of RPNConfig fields."""
    rpn = hyper_parameters.get("rpn") or {}
    return asdict(rpn) if is_dataclass(rpn) else dict(rpn)


def with_rpn_changes(hyper_parameters: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of a checkpoint's hyper-parameters with `changes` (RPNConfig fields) over its RPN settings."""
    if not changes:
        return dict(hyper_parameters)
    return {**hyper_parameters, "rpn": {**rpn_settings(hyper_parameters), **changes}}
