"""`medrpn check-data` for volumes (annotation formats csv3d, luna16, masks): what it reports for
images, per scan, in voxels and millimetres.

Every scan is read once (voxels included, so a truncated file shows here and not mid-epoch), and
the report gives: scans found, readable and unreadable with the reason; every annotation problem;
per scan its shape, voxel spacing, patient and boxes; the median spacing (the usual
`data.target_spacing`); boxes per class; box extents along x, y, z
in voxels and mm; scans without boxes; bad and duplicated boxes; and the patient-level split
`medrpn fit` makes (the data module's own, `data.split` settings included), with any patient in
two splits.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from medrpn.commands.data_report import DUPLICATE_IOU, NO_VALIDATION_NOTE, count_duplicates, quantiles
from medrpn.data.records import Record
from medrpn.data.splits import SPLITS
from medrpn.data.volume_files import read_volume
from medrpn.errors import DataError

VOLUME_FORMATS = ("csv3d", "luna16", "masks")


def check_volumes(data: dict[str, Any], source: str = "config") -> tuple[list[str], list[str]]:
    """The report lines and the reasons the volume dataset cannot be trained on (empty if it can)."""
    from medrpn.data.datamodule import LesionDataModule  # Lightning: only once there is a dataset to check

    # the annotations, patients and splits exactly as `medrpn fit` makes them
    dm = LesionDataModule(**{**data, "on_error": "skip"})
    problems, records, class_names = dm.problems, dm.records, dm.class_names
    scans: dict[str, dict[str, Any]] = {}
    readable: list[Record] = []
    for record in records:
        try:
            volume = read_volume(record.image_path)
        except DataError as error:
            problems.add("unreadable_image", error, record.key)
            continue
        scans[record.key] = {"shape": volume.shape, "spacing": volume.spacing, "patient": record.patient_id or volume.meta.get("PatientID")}
        readable.append(record)

    out = [f"medrpn check-data: {source}", f"annotations   {data['annotations']} ({len(class_names)} classes: {', '.join(class_names)}; volumes)"]
    unreadable = [p for p in problems if p.kind in ("missing_image", "unreadable_image")]
    found = len({r.key for r in records} | problems.images)
    out.append(f"scans         found {found}, readable {found - len(unreadable)}, unreadable {len(unreadable)}")
    for p in sorted(unreadable, key=lambda p: p.error.path):
        out.append(f"  unreadable  {p.error.path}: {p.error.reason}")
    other = [p for p in problems if p.kind not in ("missing_image", "unreadable_image")]
    if other:
        out.append(f"problems      {len(other)} in the annotations (each takes its scan out of training):")
        out += [f"  {p.kind:<13} {p.error}" for p in other]
    out += [f"note          {note}" for note in problems.notes]
    usable = [r for r in readable if r.key not in problems.images]
    out.append(f"usable        {len(usable)} scans ({len(problems.images)} left out)")
    for r in usable:
        scan = scans[r.key]
        shape = " x ".join(map(str, scan["shape"]))
        spacing = " x ".join(f"{s:.2f}" for s in scan["spacing"])
        out.append(f"  scan        {'/'.join(Path(r.image_path).parts[-2:])}: {shape} voxels of {spacing} mm, patient {scan['patient'] or '?'}, {len(r.boxes)} boxes")
    if usable:
        spacings = np.array([scans[r.key]["spacing"] for r in usable])
        median = " x ".join(f"{s:.2f}" for s in np.median(spacings, axis=0))
        target = data.get("target_spacing")
        resampled = f"; resampled to {' x '.join(f'{float(s):.2f}' for s in target)} mm (data.target_spacing)" if target else ""
        out.append(f"spacing       median {median} mm{resampled}")

    counts = Counter(int(label) for r in usable for label in r.labels)
    out.append("boxes/class   " + ", ".join(f"{name} {counts[i]}" for i, name in enumerate(class_names)))
    extents = [r.boxes[:, 3:] - r.boxes[:, :3] for r in usable if len(r.boxes)]
    voxels = np.concatenate(extents) if extents else np.zeros((0, 3))
    mm = np.concatenate([e * np.array(scans[r.key]["spacing"]) for e, r in zip(extents, [r for r in usable if len(r.boxes)])]) if extents else np.zeros((0, 3))
    for axis, name in enumerate("xyz"):
        out.append(f"box {name}         {quantiles(voxels[:, axis], 'voxels')}; {quantiles(mm[:, axis], 'mm')}")
    kinds = problems.counts()
    out.append(f"no boxes      {sum(1 for r in usable if len(r.boxes) == 0)} scans without boxes")
    out.append(
        f"bad boxes     outside the volume {kinds['outside'] + kinds['negative']}, inverted {kinds['inverted']}, "
        f"zero-sized {kinds['zero_size']}, not finite {kinds['not_finite']}, "
        f"duplicated {sum(count_duplicates(r) for r in usable)} (IoU >= {DUPLICATE_IOU}, same class)"
    )

    fatal: list[str] = []
    kept = {r.key for r in usable}
    splits = {name: [r for r in dm.splits[name] if r.key in kept] for name in SPLITS}
    group_of = dm.groups
    seen: dict[str, str] = {}
    overlap = set()
    for name in SPLITS:
        names = {group_of[r.key] for r in splits[name]}
        overlap |= {g for g in names if seen.setdefault(g, name) != name}
        out.append(f"split {name:<7} {len(names)} patients, {len(splits[name])} scans, {sum(len(r.boxes) for r in splits[name])} boxes")
    out.append(f"patient leak  {'none' if not overlap else f'{len(overlap)} patients in two splits'}")

    if not splits["train"]:
        fatal.append("no usable scan in the training split")
    elif sum(len(r.boxes) for r in splits["train"]) == 0:
        fatal.append("no box in the training split: nothing to learn")
    if not splits["val"] and dm.validation_by_choice_none:
        out.append(NO_VALIDATION_NOTE)
    elif not splits["val"]:
        fatal.append("the validation split is empty (raise val_fraction or add scans)")
    if data.get("on_error", "skip") == "fail" and len(problems):
        fatal.append(f"on_error is 'fail' and there are {len(problems)} problems: training would stop at the first")
    if overlap:
        fatal.append("patients in two splits")
    return out, fatal
