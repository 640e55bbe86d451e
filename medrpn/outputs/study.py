"""Everything `medrpn predict` writes for one study (or one folder of PNG/JPEG/NIfTI images).

One output folder per DICOM study (named by its StudyInstanceUID), holding:

* an overlay PNG per analysed image, written (into the staging folder, below) as soon as the
  image is done, so a long study does not keep its images in memory;
* ``sr.dcm``: the DICOM SR measurement report (`medrpn.outputs.sr`), DICOM studies only;
* ``gsps.dcm`` (and ``gsps-2.dcm``... when the study's images need different display settings):
  the presentation states (`medrpn.outputs.gsps`), for studies with findings;
* ``proposals.json`` when asked for (`medrpn.outputs.proposals`);
* ``findings.json`` (`medrpn.outputs.findings`): a folder with it is complete.

A study's outputs are replaced as a unit: everything is first written into a hidden staging folder
inside the output folder (``.medrpn-partial``); once all of it is there, the previous run's
findings.json goes first (the folder no longer looks complete), then its other outputs, then the
new files are moved in, findings.json last, and the staging folder goes. So a folder holding a
findings.json always holds one run's complete outputs, and a folder whose staging folder is still
there without a findings.json was left half-replaced by an interrupted run: `incomplete` says so,
and it is not kept as an existing output. Existing outputs are never replaced silently:
`existing_outputs` tells the caller what is there, and only a caller that was asked to overwrite
goes on. Files that are not outputs of this study (other studies' subfolders, a user's notes) stay.
"""

from __future__ import annotations

import json
import shutil
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
STAGING_NAME = ".medrpn-partial"


def gsps_name(index: int) -> str:
    """``gsps.dcm``, then ``gsps-2.dcm``, ``gsps-3.dcm``..."""
    return "gsps.dcm" if index == 0 else f"gsps-{index + 1}.dcm"


def existing_outputs(folder: Path, overlays: list[str]) -> list[Path]:
    """The files a study's outputs would replace in ``folder`` (its findings.json, SR, GSPS,
    overlays, proposals.json); none when an interrupted run left the folder `incomplete`."""
    if not folder.is_dir() or incomplete(folder):
        return []
    names = [FINDINGS_NAME, SR_NAME, PROPOSALS_NAME, *overlays]
    found = [folder / n for n in names if (folder / n).exists()]
    return found + sorted(folder.glob(GSPS_GLOB))


def incomplete(folder: Path) -> bool:
    """Whether a run stopped while replacing the outputs in ``folder`` (staging folder, no findings.json)."""
    return (folder / STAGING_NAME).is_dir() and not (folder / FINDINGS_NAME).exists()


@dataclass
class StudyOutputs:
    """Collects one study's analysed images, writes its outputs into a staging folder and moves
    them into place as a unit (module docstring).

    Args:
        folder: the output folder of the study.
        model: model and threshold, written into every output.
        study_instance_uid: the DICOM study; None for a folder of non-DICOM images (no SR/GSPS).
        anonymized_paths: whether sources are pseudonyms (recorded in findings.json).
    """

    folder: Path
    model: ModelInfo
    study_instance_uid: str | None = None
    anonymized_paths: bool = False
    images: list[tuple[Dataset | None, ImageFindings]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unwritten: list[tuple[str, str]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    _staging: Path | None = None

    @property
    def staging(self) -> Path:
        """The hidden folder this run's outputs are written into (an interrupted run's is cleared)."""
        if self._staging is None:
            self._staging = self.folder / STAGING_NAME
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging.mkdir(parents=True)
        return self._staging

    def add(self, image: ImageFindings, display: np.ndarray, header: Dataset | None = None) -> None:
        """Record an analysed image and write its overlay (``image.overlay`` names the file).

        An overlay that cannot be written (a full disk, a file system's limits) costs this image
        its place in the outputs: it is listed in ``skipped`` and ``unwritten`` with the reason.

        Args:
            image: its findings.
            display: the image as the detector saw it ((H, W) or (H, W, 3), float [0, 1] or uint8).
            header: `medrpn.outputs.references.reference_header` of a DICOM source, else None.
        """
        if image.overlay:
            try:
                write_overlay_png(self.staging / image.overlay, display, image.findings, self.model.class_names)
            except OSError as error:
                reason = f"its overlay could not be written ({error.__class__.__name__}: {error.strerror or error})"
                self.skip(image.source, reason)
                self.unwritten.append((image.source, reason))
                return
        self.images.append((header, image))

    def skip(self, source: str, reason: str) -> None:
        """Record an input of this study that could not be analysed."""
        self.skipped.append((source, reason))

    def finish(self) -> list[str]:
        """Write the SR, GSPS and findings.json and move the study's outputs into place as a unit;
        return notes on what could not be written and why.

        Raises:
            OSError: a file could not be written or moved. Before the move starts, the staging
                folder is removed and the folder is as it was; during it, the staging folder stays,
                so the folder is `incomplete` and the next run redoes it.
        """
        try:
            notes = self._write_staged()
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise
        notes += self._move_into_place()
        return notes

    def _write_staged(self) -> list[str]:
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
                write_dicom(self.staging / SR_NAME, sr)
                sr_name = SR_NAME
            try:
                states, gsps_notes = build_presentation_states(dicom, self.model)
            except (ValueError, TypeError, AttributeError, KeyError) as error:
                reason = f"{error.__class__.__name__}: {error}"
                states, gsps_notes = [], [f"no GSPS: the source headers do not allow one ({reason})"]
            notes += gsps_notes
            for index, state in enumerate(states):
                gsps_names.append(gsps_name(index))
                write_dicom(self.staging / gsps_names[-1], state)
            if not states and not gsps_notes:
                notes.append("no findings, so no GSPS (the SR says the study was analysed without findings)")
        elif self.study_instance_uid is None:
            notes.append("no DICOM study to file them with: no SR or GSPS")
        write_findings_json(
            self.staging / FINDINGS_NAME,
            images=[im for _, im in self.images],
            model=self.model,
            study_instance_uid=self.study_instance_uid,
            sr=sr_name,
            gsps=gsps_names,
            notes=notes,
            skipped=self.skipped,
            anonymized_paths=self.anonymized_paths,
        )
        return notes

    def _move_into_place(self) -> list[str]:
        """Replace the previous outputs in the folder with the staged ones, findings.json first out
        and last in; return a note when an earlier run's proposals.json goes without a new one."""
        new = sorted(p.name for p in self.staging.iterdir() if p.name != FINDINGS_NAME)
        old = _listed_outputs(self.folder / FINDINGS_NAME) | {PROPOSALS_NAME, *new}
        if self.study_instance_uid is not None:  # a study's folder: its DICOM outputs are all medrpn's
            old |= {SR_NAME} | {p.name for p in self.folder.glob(GSPS_GLOB)}
        notes = []
        if (self.folder / PROPOSALS_NAME).exists() and PROPOSALS_NAME not in new:
            notes.append(f"removed the earlier run's {PROPOSALS_NAME} (--proposals writes new ones)")
        (self.folder / FINDINGS_NAME).unlink(missing_ok=True)
        for name in sorted(old):
            (self.folder / name).unlink(missing_ok=True)
        for name in [*new, FINDINGS_NAME]:
            (self.staging / name).replace(self.folder / name)
            self.written.append(self.folder / name)
        self.staging.rmdir()
        return notes


def _listed_outputs(path: Path) -> set[str]:
    """File names (in the same folder) that a previous run's findings.json lists; empty if none."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    names = set()
    if isinstance(document, dict):
        dicom = document.get("dicom") or {}
        names |= {dicom.get("sr")} | set(dicom.get("gsps") or [])
        names |= {im.get("overlay") for im in document.get("images") or [] if isinstance(im, dict)}
    # only plain file names: a findings.json never makes us delete anything outside its folder
    return {n for n in names if isinstance(n, str) and n and Path(n).name == n}

