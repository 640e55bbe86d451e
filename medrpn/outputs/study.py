"""Everything `medrpn predict` writes for one study (or one folder of PNG/JPEG/NIfTI images).

One output folder per DICOM study (named by its StudyInstanceUID), holding:

* an overlay PNG per analysed image, written as soon as the image is done (so a long study does
  not keep its images in memory);
* ``sr.dcm``: the DICOM SR measurement report (`medrpn.outputs.sr`), DICOM studies only;
* ``gsps.dcm`` (and ``gsps-2.dcm``... when the study's images need different display settings):
  the presentation states (`medrpn.outputs.gsps`), for studies with findings;
* ``findings.json`` (`medrpn.outputs.findings`), written last: a folder with it is complete.

Every file is written atomically (temporary file + rename). Existing outputs are never replaced
silently: `existing_outputs` tells the caller what is there, and only a caller that was asked to
overwrite goes on; the files a previous run listed in its findings.json that this run does not
write again (an image that is gone from the input) are then removed, so the folder describes
one run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from medrpn.outputs.findings import ImageFindings, ModelInfo, write_findings_json
from medrpn.outputs.gsps import build_presentation_states
from medrpn.outputs.overlay import write_overlay_png
from medrpn.outputs.proposals import PROPOSALS_NAME
from medrpn.outputs.references import missing_uids
from medrpn.outputs.sr import build_measurement_report, write_dicom

FINDINGS_NAME = "findings.json"
SR_NAME = "sr.dcm"
GSPS_GLOB = "gsps*.dcm"


def gsps_name(index: int) -> str:
    """``gsps.dcm``, then ``gsps-2.dcm``, ``gsps-3.dcm``..."""
    return "gsps.dcm" if index == 0 else f"gsps-{index + 1}.dcm"


def existing_outputs(folder: Path, overlays: list[str]) -> list[Path]:
    """The files a study's outputs would replace in ``folder`` (its findings.json, SR, GSPS,
    overlays, proposals.json)."""
    if not folder.is_dir():
        return []
    names = [FINDINGS_NAME, SR_NAME, PROPOSALS_NAME, *overlays]
    found = [folder / n for n in names if (folder / n).exists()]
    return found + sorted(folder.glob(GSPS_GLOB))


@dataclass
class StudyOutputs:
    """Collects one study's analysed images and writes its outputs.

    Args:
        folder: the output folder of the study.
        model: model and threshold, written into every output.
        study_instance_uid: the DICOM study; None for a folder of non-DICOM images (no SR/GSPS).
    """

    folder: Path
    model: ModelInfo
    study_instance_uid: str | None = None
    images: list[tuple[Dataset | None, ImageFindings]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    def add(self, image: ImageFindings, display: np.ndarray, header: Dataset | None = None) -> None:
        """Record an analysed image and write its overlay (``image.overlay`` names the file).

        Args:
            image: its findings.
            display: the image as the detector saw it ((H, W) or (H, W, 3), float [0, 1] or uint8).
            header: `medrpn.outputs.references.reference_header` of a DICOM source, else None.
        """
        if image.overlay:
            path = write_overlay_png(self.folder / image.overlay, display, image.findings, self.model.class_names)
            self.written.append(path)
        self.images.append((header, image))

    def skip(self, source: str, reason: str) -> None:
        """Record an input of this study that could not be analysed."""
        self.skipped.append((source, reason))

    def finish(self) -> list[str]:
        """Write the SR, GSPS and findings.json; return notes on what could not be written and why."""
        self.folder.mkdir(parents=True, exist_ok=True)
        previous = _listed_outputs(self.folder / FINDINGS_NAME)
        notes: list[str] = []
        sr_name, gsps_names = None, []
        dicom = [(h, im) for h, im in self.images if h is not None]
        if self.study_instance_uid is not None and dicom:
            unusable = [(im.source, missing_uids(h)) for h, im in dicom if missing_uids(h)]
            for source, missing in unusable:
                notes.append(f"{source}: no {', '.join(missing)}, so no SR/GSPS can reference it")
            dicom = [(h, im) for h, im in dicom if not missing_uids(h)]
        if self.study_instance_uid is not None and dicom:
            all_succeeded = not self.skipped and len(dicom) == len(self.images)
            # a source header highdicom cannot work with costs this study its DICOM outputs, not the run
            try:
                sr = build_measurement_report(dicom, self.model, all_succeeded=all_succeeded)
            except (ValueError, TypeError, AttributeError, KeyError) as error:
                notes.append(f"no SR: the source headers do not allow one ({error.__class__.__name__}: {error})")
            else:
                self.written.append(write_dicom(self.folder / SR_NAME, sr))
                sr_name = SR_NAME
            try:
                states, gsps_notes = build_presentation_states(dicom, self.model)
            except (ValueError, TypeError, AttributeError, KeyError) as error:
                reason = f"{error.__class__.__name__}: {error}"
                states, gsps_notes = [], [f"no GSPS: the source headers do not allow one ({reason})"]
            notes += gsps_notes
            for index, state in enumerate(states):
                gsps_names.append(gsps_name(index))
                self.written.append(write_dicom(self.folder / gsps_names[-1], state))
            if not states and not gsps_notes:
                notes.append("no findings, so no GSPS (the SR says the study was analysed without findings)")
        elif self.study_instance_uid is None:
            notes.append("no DICOM study to file them with: no SR or GSPS")
        findings = write_findings_json(
            self.folder / FINDINGS_NAME,
            images=[im for _, im in self.images],
            model=self.model,
            study_instance_uid=self.study_instance_uid,
            sr=sr_name,
            gsps=gsps_names,
            notes=notes,
            skipped=self.skipped,
        )
        self.written.append(findings)
        current = {p.name for p in self.written}
        for name in sorted(previous - current):
            (self.folder / name).unlink(missing_ok=True)
        return notes


def _listed_outputs(path: Path) -> set[str]:
    """File names (in the same folder) that a previous run's findings.json lists; empty if none."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    names = set()
    if isinstance(document, dict):
        dicom = document.get("dicom") or {}
        names |= {dicom.get("sr")} | set(dicom.get("gsps") or [])
        names |= {im.get("overlay") for im in document.get("images") or [] if isinstance(im, dict)}
    # only plain file names: a findings.json never makes us delete anything outside its folder
    return {n for n in names if isinstance(n, str) and n and Path(n).name == n}

