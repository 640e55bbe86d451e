"""Findings for new scans with a 3D checkpoint: volume files and DICOM series in, one output
folder per scan out.

1. **find** the scans: a volume file (NIfTI, MetaImage, NRRD) given as input, or every volume file
   and every DICOM series (by SeriesInstanceUID, `medrpn.data.dicom_series.find_series`) under an
   input folder.
2. **detect** on each whole scan, window by window, with the model loaded once
   (`LesionDetectionModule.detect_scan`; intensities scaled as in training; a model trained on
   several sequences (`data.sequences`) reads them beside each scan as its channels, and the
   scans are found by the first sequence's name; a model trained with `data.target_spacing` sees
   each scan resampled to it, and its boxes are mapped back to the scan's own voxels). A scan
   that cannot be read is listed with the reason and the run goes on.
3. **write** per scan, into a folder named after it (made unique): ``findings.json`` (voxel and
   LPS millimetre coordinates, `medrpn.outputs.volume_findings`), ``montage.png`` (three planes
   through each finding, `medrpn.outputs.volume_montage`) and, for a DICOM series, ``sr.dcm`` (TID
   1500, the finding's box on every slice it spans, `medrpn.outputs.volume_sr`) and ``gsps.dcm``
   (the same boxes as a presentation state, `medrpn.outputs.volume_gsps`). A scan whose folder
   already holds findings is left alone unless ``overwrite``.

The score threshold is chosen as for images (`medrpn.inference.predict.resolve_threshold`): the
one given, else the checkpoint's operating point (picked per scan on validation scans), else 0.5.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medrpn import __version__
from medrpn.data.resampling import grid_zoom, resample_channels
from medrpn.data.limits import DEFAULT_MAX_DECODED_BYTES
from medrpn.data.volume_files import is_volume_file
from medrpn.data.volume_patches import scale_to_unit
from medrpn.errors import DataError, MedrpnError
from medrpn.outputs.findings import ModelInfo, file_sha256
from medrpn.outputs.volume_findings import make_volume_findings, write_volume_findings_json
from medrpn.outputs.volume_montage import write_volume_montage

FINDINGS_NAME = "findings.json"
MONTAGE_NAME = "montage.png"
SR_NAME = "sr.dcm"


@dataclass
class ScanInput:
    """One scan to analyse: a volume file, or a DICOM series (its folder and SeriesInstanceUID)."""

    path: Path
    series_uid: str | None = None
    name: str = ""


@dataclass
class VolumePredictReport:
    """What a run did: scans analysed (with their output folder and number of findings), kept and failed."""

    written: list[tuple[str, Path, int]] = field(default_factory=list)
    kept: list[tuple[str, Path]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def find_scans(root: Path, sequences: list[str] | None = None) -> list[ScanInput]:
    """The scans of `root`: a volume file, or the volume files and DICOM series under a folder;
    for a model trained on `sequences`, every file or folder named as the first of them (its
    other sequences are read beside it), named after the folder holding them."""
    from medrpn.data.dicom_series import find_series

    if not root.exists():
        raise MedrpnError(f"{root}: input not found")
    if sequences:
        found = [root] if root.name == sequences[0] else sorted(root.rglob(sequences[0]))
        if not found:
            raise MedrpnError(f"{root}: no {sequences[0]} here (the model reads the sequences {', '.join(sequences)} as channels)")
        return [ScanInput(p, name=str(p.parent.relative_to(root)) if p != root and p.parent != root else p.parent.name) for p in found]
    if root.is_file():
        if not is_volume_file(root):
            raise MedrpnError(f"{root}: not a volume file (NIfTI .nii/.nii.gz, MetaImage .mhd/.mha, NRRD .nrrd)")
        return [ScanInput(root, name=root.name)]
    scans = [ScanInput(p, name=str(p.relative_to(root))) for p in sorted(root.rglob("*")) if p.is_file() and is_volume_file(p)]
    for uid, files in sorted(find_series(root).items(), key=lambda item: str(item[1][0])):
        folder = Path(*_common_parts([f.parent.parts for f in files]))
        relative = folder.relative_to(root) if folder != root else Path(root.name)
        scans.append(ScanInput(folder, uid, str(relative)))
    return scans


def _common_parts(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    common = paths[0]
    for parts in paths[1:]:
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return common


def _written_for_another(folder: Path, source: str) -> bool:
    """Whether `folder` holds the findings of another scan (an earlier run's, of the same folder name)."""
    try:
        return json.loads((folder / FINDINGS_NAME).read_text(encoding="utf-8"))["scan"]["source"] != source
    except (OSError, ValueError, KeyError, TypeError):
        return False  # none there, or not a findings file of ours: this scan's to write


def _folder_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"(\.nii\.gz|\.nii|\.mhd|\.mha|\.nrrd|\.nhdr)$", "", name, flags=re.IGNORECASE)
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "scan"
    folder, n = base, 1
    while folder in taken:
        n += 1
        folder = f"{base}-{n}"
    taken.add(folder)
    return folder


def predict_volumes(
    ckpt: str | Path,
    input: str | Path,
    output: str | Path,
    score_threshold: float | None = None,
    overwrite: bool = False,
    max_decoded_bytes: int | None = None,
) -> VolumePredictReport:
    """Runs a 3D checkpoint over the scans of `input` and writes one folder of outputs per scan
    under `output` (see the module docstring). Prints one line per scan and a summary.

    `max_decoded_bytes` refuses a scan whose header declares more voxel data (default: the
    checkpoint's data.read.max_decoded_bytes, 1 GiB unless set in training)."""
    from medrpn.inference.predict import resolve_threshold
    from medrpn.training.lightning_module import module_from_checkpoint, read_module_checkpoint

    ckpt, root, output = Path(ckpt), Path(input), Path(output)
    checkpoint = read_module_checkpoint(ckpt)
    module = module_from_checkpoint(ckpt, checkpoint=checkpoint)
    if module.spatial_dims != 3:
        raise MedrpnError(f"{ckpt}: a 2D checkpoint; `medrpn predict` runs it on images")
    threshold, source, point = resolve_threshold(checkpoint, score_threshold)
    if max_decoded_bytes is None:
        read = (checkpoint.get("datamodule_hyper_parameters") or {}).get("read") or {}
        max_decoded_bytes = int(read.get("max_decoded_bytes") or DEFAULT_MAX_DECODED_BYTES)
    model = ModelInfo(
        checkpoint=str(ckpt.resolve()), checkpoint_sha256=file_sha256(ckpt), class_names=list(module.class_names),
        score_threshold=threshold, threshold_source=source, operating_point=point, version=__version__,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = module.to(device).eval()
    report = VolumePredictReport()
    taken: set[str] = set()
    sequences = (checkpoint.get("datamodule_hyper_parameters") or {}).get("sequences") or None
    target_spacing = (checkpoint.get("datamodule_hyper_parameters") or {}).get("target_spacing") or None
    for scan in find_scans(root, sequences):
        folder = output / _folder_name(scan.name, taken)
        while _written_for_another(folder, scan.name):  # an earlier run's other scan of the same name
            folder = output / _folder_name(scan.name, taken)
        if (folder / FINDINGS_NAME).exists() and not overwrite:
            report.kept.append((scan.name, folder))
            print(f"medrpn predict: {scan.name}: kept the findings already in {folder} (--overwrite replaces them)", flush=True)
            continue
        try:
            volume, channels = _read_scan(scan, sequences, max_decoded_bytes)
        except DataError as error:
            report.failed.append((scan.name, error.reason))
            print(f"medrpn predict: {scan.name}: skipped: {error.reason}", flush=True)
            continue
        zoom = np.ones(3) if target_spacing is None else grid_zoom(channels.shape[1:], volume.spacing, target_spacing)
        with torch.no_grad():
            found = module.detect_scan(torch.from_numpy(resample_channels(channels, zoom)).to(device))
        findings = make_volume_findings(
            found["boxes"].cpu().numpy() / np.tile(zoom, 2),  # back to the scan's own voxels
            found["scores"].cpu().numpy(), found["labels"].cpu().numpy(),
            model.class_names, volume.geometry, threshold,
        )
        try:  # findings.json last: a folder without it is redone by the next run
            write_volume_montage(folder / MONTAGE_NAME, channels[0], volume.spacing, findings, model.class_names)
            sr, gsps, notes = _write_dicom(folder, volume, findings, model)
            write_volume_findings_json(
                folder / FINDINGS_NAME, findings=findings, model=model, source=scan.name, geometry=volume.geometry,
                meta=volume.meta, overlay=MONTAGE_NAME, sr=sr, gsps=gsps, notes=notes,
            )
        except OSError as error:
            report.failed.append((scan.name, f"cannot write {error.filename or folder}: {error.strerror or error}"))
            print(f"medrpn predict: {scan.name}: not written: {error.strerror or error} ({error.filename or folder})", flush=True)
            continue
        report.written.append((scan.name, folder, len(findings)))
        print(f"medrpn predict: {scan.name}: {len(findings)} finding(s) -> {folder}", flush=True)
    total = sum(n for _, _, n in report.written)
    print(
        f"medrpn predict: {len(report.written)} scan(s) analysed, {total} finding(s) at score >= {threshold:.4g} "
        f"({source}); {len(report.kept)} kept, {len(report.failed)} could not be read or written",
        flush=True,
    )
    return report


def _write_dicom(folder: Path, volume, findings, model: ModelInfo) -> tuple[str | None, list[str], list[str]]:
    """The scan's SR and presentation states when it is DICOM with the UIDs a reference needs:
    (SR name, GSPS names, notes); else none and the reason. An enhanced multi-frame file gets the
    SR (regions on its frames) but no presentation state, as for multi-frame images."""
    import pydicom

    from medrpn.outputs.references import missing_uids, reference_header
    from medrpn.outputs.sr import write_dicom
    from medrpn.outputs.study import gsps_name
    from medrpn.outputs.volume_gsps import build_volume_presentation_states
    from medrpn.outputs.volume_sr import build_volume_report

    files = volume.meta.get("SliceFiles")
    if not files:
        return None, [], ["no DICOM SR or GSPS: the scan is not DICOM"]
    frames = volume.meta.get("SliceFrames")
    read = {f: reference_header(pydicom.dcmread(f, stop_before_pixels=True)) for f in dict.fromkeys(files)}
    headers = [read[f] for f in files]  # a multi-frame file's header once per slice
    missing = sorted({uid for header in read.values() for uid in missing_uids(header)})
    if missing:
        return None, [], [f"no DICOM SR or GSPS: the series' files lack {', '.join(missing)}"]
    write_dicom(folder / SR_NAME, build_volume_report(headers, findings, volume.geometry, model, frames))
    if frames is not None:
        return SR_NAME, [], ["no GSPS: the scan is an enhanced multi-frame file; its findings are in the SR (on its frames) and the montage"]
    states, notes = build_volume_presentation_states(headers, findings, volume.geometry, model)
    names = [gsps_name(i) for i in range(len(states))]
    for name, state in zip(names, states):
        write_dicom(folder / name, state)
    return SR_NAME, names, notes


def _read_scan(scan: ScanInput, sequences: list[str] | None, max_decoded_bytes: int):
    """The scan's `Volume` (of its first sequence) and its channels (C, X, Y, Z) scaled as in training."""
    from medrpn.data.dicom_series import read_dicom_series
    from medrpn.data.volume_loading import read_channels

    if sequences or scan.series_uid is None:
        return read_channels(scan.path, sequences, max_decoded_bytes)
    volume = read_dicom_series(scan.path, scan.series_uid, max_decoded_bytes)
    return volume, scale_to_unit(volume.array)[None]
