"""Findings for new images: a file or a folder tree in, one output folder per study out.

The run, in order:

1. **scan** the input (`medrpn.inference.scan.scan_inputs`): DICOM files are recognised by content (the ``DICM``
   marker) or name (``.dcm``, ``.dicom``, no suffix), their headers read without pixels and grouped
   by StudyInstanceUID (ordered by series and instance number; each frame of a multi-frame file is
   an image). DICOM objects that are not images (structured reports, RT structure sets,
   presentation states...) are noted and skipped; files whose header cannot be read are listed
   with the reason. PNG/JPEG files and NIfTI slices are grouped by the folder they are in.
2. **plan**: every group gets an output folder of its own, also when a study and an input folder
   (or an earlier run's other study) would share a name: the later one gets ``-2``... (said in
   the log). A study whose output folder already holds medrpn outputs is left alone (and not even
   analysed) unless ``overwrite`` is set; one that an interrupted run left incomplete is redone.
3. **detect** with the model loaded once, in batches; DataLoader worker processes read and
   transform the next images while the model runs (`num_workers`). An image that cannot be
   decoded is listed with the reason; the run goes on.
4. **write** per study (`medrpn.outputs.study`): overlay PNGs, DICOM SR, GSPS, findings JSON;
   with ``proposals``, also every RPN proposal in ``proposals.json`` (`medrpn.outputs.proposals`),
   for a second stage of the user's own. A study's outputs are staged and moved into place as a
   unit; a study (or an overlay) that cannot be written is listed with the reason and the run goes on.

The checkpoint carries everything needed (classes, detector settings, input size, how images were
read in training), so no training config is required. The score threshold is, in order: the one
given, the checkpoint's ``operating_point["score_threshold"]`` (chosen on validation data), or
0.5; the findings JSON, SR and GSPS say which. With a second stage (``--second-stage``, a crop
classifier from ``medrpn fit-crops``) the detections are re-scored / re-labelled by it, and its own
operating point (picked on validation data for the re-scored output) replaces the detector's.
With ``anonymize_paths`` no input path or checkpoint path is written (`medrpn.outputs.findings`).

The RPN's test-time proposal settings (how many proposals per image, their NMS IoU, mirrored
views) are the checkpoint's unless given (``proposals_per_image``, ``proposal_nms``,
``test_flips``): a candidate generator feeding a second stage of the user's own wants more, and
more overlapping, proposals than the detector was trained to score. Both JSON files record the
settings used and which were changed. Nothing printed names a patient: messages carry file paths
and reasons only.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.ops import clip_boxes_to_image
from tqdm import tqdm

from medrpn import __version__
from medrpn.data.io import ReadConfig, read_image
from medrpn.data.transforms import build_transform, fit_scale
from medrpn.errors import ConfigError, DataError, MedrpnError
from medrpn.model.rpn import RPNConfig
from medrpn.outputs import ImageFindings, ModelInfo, make_findings
from medrpn.outputs.findings import file_sha256
from medrpn.outputs.overlay import to_display_uint8
from medrpn.outputs.proposals import PROPOSALS_NAME, ImageProposals, image_proposals, write_proposals
from medrpn.inference.proposal_settings import (
    CHANGEABLE_PROPOSAL_SETTINGS,
    describe_proposal_settings,
    proposal_changes,
    rpn_settings,
    with_rpn_changes,
)
from medrpn.outputs.study import FINDINGS_NAME, StudyOutputs, existing_outputs, incomplete
from medrpn.inference.onnx_model import OnnxDetector, is_onnx
from medrpn.inference.scan import InputGroup, InputItem, Scan, scan_inputs
from medrpn.second_stage.rescoring import SecondStage, check_classes, load_second_stage
from medrpn.training.lightning_module import LesionDetectionModule, module_from_checkpoint, read_module_checkpoint

DEFAULT_SCORE_THRESHOLD = 0.5


@dataclass
class PredictReport:
    """What a prediction run did.

    Attributes:
        images: images (frames, slices) analysed.
        findings: findings reported (at or above the threshold).
        studies: output folders written (one per DICOM study, one per folder of other images).
        written: every file written.
        skipped: ``(file, reason)`` for inputs that could not be read.
        notes: ``(file, note)`` for inputs left out on purpose (DICOM objects that are not images).
        kept: output folders left as they were because they already held outputs.
        ignored: files of other types in the input folder (not DICOM, PNG, JPEG or NIfTI).
        score_threshold / threshold_source: the threshold used and where it came from.
    """

    images: int = 0
    findings: int = 0
    studies: list[Path] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    ignored: int = 0
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    threshold_source: str = "default"


# ---------------------------------------------------------------------------------------------
# the checkpoint


def _build_module(path: Path, checkpoint: dict[str, Any], rpn_changes: dict[str, Any] | None = None) -> LesionDetectionModule:
    """The checkpoint's module in eval mode, with `rpn_changes` (RPNConfig fields) over its RPN settings."""
    changed = with_rpn_changes(checkpoint["hyper_parameters"], rpn_changes or {}) if rpn_changes else None
    return module_from_checkpoint(path, overrides=changed, checkpoint=checkpoint)


def load_checkpoint(path: str | Path) -> tuple[LesionDetectionModule, dict[str, Any]]:
    """The trained module (eval mode, CPU) and the data settings it was trained with.

    Loaded with `weights_only=True`: a checkpoint can carry tensors and plain data, never code.
    """
    checkpoint = read_module_checkpoint(path)
    return _build_module(Path(path), checkpoint), dict(checkpoint.get("datamodule_hyper_parameters") or {})


def resolve_threshold(checkpoint: dict[str, Any], given: float | None) -> tuple[float, str, dict[str, float] | None]:
    """The score threshold to use: ``(threshold, source, operating point of the checkpoint or None)``.

    ``given`` (from ``--score-threshold``) wins; else the checkpoint's
    ``operating_point["score_threshold"]``; else `DEFAULT_SCORE_THRESHOLD`.

    Raises:
        ConfigError: a threshold outside [0, 1].
    """
    point = checkpoint.get("operating_point")
    if isinstance(point, dict) and "score_threshold" in point:
        point = {str(k): _plain(v) for k, v in point.items()}
    else:
        point = None
    if given is not None:
        threshold, source = float(given), "command line"
    elif point is not None:
        threshold, source = point["score_threshold"], "checkpoint operating point"
    else:
        threshold, source = DEFAULT_SCORE_THRESHOLD, "default"
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"score threshold must be within [0, 1], got {threshold} ({source})")
    return threshold, source, point


def _plain(value: Any) -> Any:
    """A number as a float (tensors and numpy scalars included), anything else as it is."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


# ---------------------------------------------------------------------------------------------
# reading in worker processes


class _ImageLoader(torch.utils.data.Dataset):
    """Reads and transforms one image per item (in DataLoader workers); a failure becomes an ``error``."""

    def __init__(self, items: list[tuple[Path, int | None]], image_size: int, read_config: ReadConfig) -> None:
        self.items = items
        self.image_size = image_size
        self.read_config = read_config
        self.transform = build_transform(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, frame = self.items[index]
        try:
            image = read_image(path, frame, self.read_config)
        except DataError as error:
            return {"index": index, "error": error.reason}
        except Exception as error:  # a decoder failing in an unforeseen way must not end the run
            return {"index": index, "error": f"unreadable image ({error.__class__.__name__}: {error})"}
        pixels = self.transform(image=image.array, bboxes=np.zeros((0, 4)), labels=[])["image"]
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return {
            "index": index,
            "pixels": torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)),
            "display": torch.from_numpy(to_display_uint8(image.array)),  # uint8: 1/4 of float32 to pass back
            "spacing": image.spacing,
        }


def _collate(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return samples


# ---------------------------------------------------------------------------------------------
# the run


def default_num_workers() -> int:
    """Reader processes: one per CPU core left after the one running the model, at most 4."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def predict_files(
    ckpt: str | Path,
    inputs: str | Path,
    output: str | Path,
    score_threshold: float | None = None,
    batch_size: int = 8,
    num_workers: int | None = None,
    overwrite: bool = False,
    proposals: bool = False,
    second_stage: str | Path | None = None,
    proposals_per_image: int | None = None,
    proposal_nms: float | None = None,
    test_flips: list[str] | None = None,
    max_decoded_bytes: int | None = None,
    anonymize_paths: bool = False,
) -> PredictReport:
    """Find lesions in every image under ``inputs``; write per study into ``output``.

    Args:
        ckpt: checkpoint written by ``medrpn fit``.
        inputs: an image file or a folder tree (DICOM, PNG, JPEG, NIfTI).
        output: folder for the outputs; one subfolder per DICOM study (named by its
            StudyInstanceUID), and for other images the folder structure of ``inputs``.
        score_threshold: report findings scoring at least this; None: the checkpoint's
            operating point, else 0.5.
        batch_size: images per forward pass.
        num_workers: reader processes (0 reads in this process); None: `default_num_workers`.
        overwrite: replace existing outputs (else studies with outputs are left alone).
        proposals: also write every RPN proposal (no threshold) to ``proposals.json`` per folder.
        second_stage: a ``medrpn fit-crops`` checkpoint re-scoring / re-labelling the detections.
        proposals_per_image, proposal_nms, test_flips: the RPN's test-time settings
            (``rpn.post_nms_top_n_test``, ``rpn.nms_thresh``, ``rpn.test_flips``); None: the
            checkpoint's. They change what a full detector's RoI heads score too.
        max_decoded_bytes: skip files whose header declares more decoded pixel data
            (`medrpn.data.limits`); None: the checkpoint's ``data.read.max_decoded_bytes``.
        anonymize_paths: write no input or checkpoint path: images are named by SOP Instance UID
            (DICOM) or a hash of their path, folders of other images by a hash of theirs.

    Returns:
        A `PredictReport`.
    """
    ckpt, inputs, output = Path(ckpt), Path(inputs), Path(output)
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if inputs.is_dir() and output.resolve() == inputs.resolve():
        raise MedrpnError(f"{output}: the output folder must not be the input folder")
    changes = proposal_changes(proposals_per_image, proposal_nms, test_flips)
    module, model, image_size, read_config = _load(ckpt, score_threshold, changes, anonymize_paths)
    if max_decoded_bytes is not None:
        read_config = ReadConfig.parse({**read_config.as_dict(), "max_decoded_bytes": max_decoded_bytes})
    if second_stage is not None and is_onnx(ckpt):
        raise ConfigError(f"{ckpt}: a second stage needs the PyTorch checkpoint (it pools the detector's features)")
    stage = None if second_stage is None else _load_second_stage(Path(second_stage), module, model, score_threshold)

    scan = scan_inputs(
        inputs, exclude=output, axis=read_config.axis, max_decoded_bytes=read_config.max_decoded_bytes,
        anonymize_paths=anonymize_paths,
    )
    report = PredictReport(
        skipped=list(scan.skipped), notes=list(scan.notes), ignored=scan.ignored,
        score_threshold=model.score_threshold, threshold_source=model.threshold_source,
    )
    for path, reason in scan.skipped:
        print(f"skipped {path}: {reason}", flush=True)
    for path, note in scan.notes:
        print(f"note: {path}: {note}", flush=True)
    studies = _plan(scan, output, model, overwrite, anonymize_paths, report)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    with _library_warnings_once():
        _detect_and_write(module, studies, model, image_size, read_config, batch_size, workers, report, proposals=proposals, second_stage=stage)

    print(
        f"medrpn predict: {report.images} images in {len(report.studies)} output folders, {report.findings} findings "
        f"with score >= {model.score_threshold:g} ({model.threshold_source}), {len(report.skipped)} files skipped, "
        f"{len(report.notes)} non-image DICOM files skipped, {len(report.kept)} existing outputs kept"
        + (f", {report.ignored} other files ignored" if report.ignored else "")
        + f"; written to {output.resolve()}",
        flush=True,
    )
    return report


def _load(
    ckpt: Path, score_threshold: float | None, rpn_changes: dict[str, Any], anonymize_paths: bool = False
) -> tuple[LesionDetectionModule | OnnxDetector, ModelInfo, int, ReadConfig]:
    """The module (eval, on the GPU when there is one), its description (without the checkpoint's
    path when ``anonymize_paths``), input size and read settings. An exported ``.onnx`` model runs
    in ONNX Runtime (`OnnxDetector`), described by its metadata: the same findings, SR and GSPS
    UIDs as the checkpoint it was exported from."""
    if is_onnx(ckpt):
        return _load_onnx(ckpt, score_threshold, rpn_changes, anonymize_paths)
    checkpoint = read_module_checkpoint(ckpt)
    threshold, source, point = resolve_threshold(checkpoint, score_threshold)
    module = _build_module(ckpt, checkpoint, rpn_changes).to("cuda" if torch.cuda.is_available() else "cpu")
    settings = module.detector_config.rpn
    if rpn_changes:
        trained = RPNConfig(**rpn_settings(checkpoint["hyper_parameters"]))
        print(
            "medrpn predict: proposal settings changed from the checkpoint's: "
            + ", ".join(f"{CHANGEABLE_PROPOSAL_SETTINGS[k][1]} {getattr(trained, k)} -> {getattr(settings, k)}" for k in rpn_changes)
            + "; the findings come from these proposals, so the checkpoint's operating point (its sensitivity "
            "and false positives per image) was measured with other settings",
            flush=True,
        )
    data_settings = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    model = ModelInfo(
        checkpoint=None if anonymize_paths else str(ckpt.resolve()),
        checkpoint_sha256=file_sha256(ckpt),
        class_names=list(module.class_names),
        score_threshold=threshold,
        threshold_source=source,
        operating_point=point,
        proposal_settings=describe_proposal_settings(settings, rpn_changes),
        version=__version__,
    )
    return module, model, int(data_settings.get("image_size", 256)), ReadConfig.parse(data_settings.get("read"))


def _load_onnx(
    path: Path, score_threshold: float | None, rpn_changes: dict[str, Any], anonymize_paths: bool
) -> tuple[OnnxDetector, ModelInfo, int, ReadConfig]:
    if rpn_changes:
        raise ConfigError(f"{path}: the proposal settings of an exported model are fixed in its graph; export again to change them")
    detector = OnnxDetector(path)
    meta = detector.metadata
    threshold, source, point = resolve_threshold(meta, score_threshold)
    model = ModelInfo(
        checkpoint=None if anonymize_paths else str(path.resolve()),
        checkpoint_sha256=meta["source_checkpoint_sha256"],
        class_names=detector.class_names,
        score_threshold=threshold,
        threshold_source=source,
        operating_point=point,
        proposal_settings=meta.get("proposal_settings"),
        version=__version__,
    )
    return detector, model, int(meta["image_size"]), ReadConfig.parse(meta.get("read"))


def _load_second_stage(
    path: Path, module: LesionDetectionModule, model: ModelInfo, score_threshold: float | None
) -> SecondStage:
    """The second stage on the detector's device. Its scores are not the detector's, so its own
    operating point replaces the detector's as the default threshold (``model`` is updated)."""
    stage = load_second_stage(path)
    check_classes(stage, module.hparams.class_names, path)  # the data's classes (RPN-only: not the model's)
    model.class_names = stage.class_names  # the labels are the second stage's
    threshold, source, point = resolve_threshold({"operating_point": stage.operating_point}, score_threshold)
    model.score_threshold, model.operating_point = threshold, point
    model.threshold_source = "second-stage operating point" if source == "checkpoint operating point" else source
    return stage.to(next(module.parameters()).device)


def _plan(
    scan: Scan, output: Path, model: ModelInfo, overwrite: bool, anonymize_paths: bool, report: PredictReport
) -> list[tuple[InputGroup, StudyOutputs]]:
    """The groups to analyse, each with its writer and an output folder of its own; groups with
    existing outputs are kept unless ``overwrite`` (the writer replaces them as a unit)."""
    _give_unique_folders(scan.groups, output)
    studies = []
    for group in scan.groups:
        folder = output / group.folder
        existing = existing_outputs(folder, [item.overlay for item in group.items])
        if existing and not overwrite:
            report.kept.append(folder)
            print(f"kept existing outputs in {folder} ({len(existing)} files); use --overwrite to replace them")
            continue
        if existing:
            print(f"replacing existing outputs in {folder}", flush=True)
        elif incomplete(folder):
            print(f"an earlier run stopped while writing {folder}: writing it again", flush=True)
        studies.append((group, StudyOutputs(folder, model, group.study_instance_uid, anonymize_paths)))
    return studies


def _give_unique_folders(groups: list[InputGroup], output: Path) -> None:
    """Make every group's output folder its own: no two groups of this run share one (compared
    without case, as some file systems do), and none takes a folder an earlier run wrote for another
    study. DICOM studies choose first, then folders of other images, each in scan order; a group
    whose folder is taken gets the first free ``<name>-2``, ``<name>-3``..., and the log says so."""
    taken: set[str] = set()
    for group in sorted(groups, key=lambda g: g.study_instance_uid is None):  # stable: scan order within
        wanted = folder = group.folder
        n = 1
        while wanted != Path(".") and (folder.as_posix().lower() in taken or _written_for_another(output / folder, group)):
            n += 1
            folder = wanted.with_name(f"{wanted.name}-{n}")
        taken.add(folder.as_posix().lower())
        if folder != wanted:
            what = f"study {group.study_instance_uid}" if group.study_instance_uid else f"the images of {wanted}"
            print(f"note: {output / wanted} is another input group's output folder; {what}: {output / folder}",
                  flush=True)
            group.folder = folder


def _written_for_another(folder: Path, group: InputGroup) -> bool:
    """Whether ``folder`` holds a findings.json of another study (or of images of no study, when
    ``group`` is a study): its outputs are not this group's to keep or replace."""
    try:
        document = json.loads((folder / FINDINGS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(document, dict)
        and "study_instance_uid" in document
        and document["study_instance_uid"] != group.study_instance_uid
    )


def _detect_and_write(
    module: LesionDetectionModule | OnnxDetector,
    studies: list[tuple[InputGroup, StudyOutputs]],
    model: ModelInfo,
    image_size: int,
    read_config: ReadConfig,
    batch_size: int,
    workers: int,
    report: PredictReport,
    proposals: bool = False,
    second_stage: SecondStage | None = None,
) -> None:
    """Read (in ``workers`` processes), detect in batches, and write, study after study.

    Images come in study order, so a study's SR/GSPS/JSON are written once its last image is
    done. Writing runs in one thread beside the model (in submission order: an image's overlay
    before its study's SR); the model releases the GIL while it computes. With ``proposals``, a
    study's proposals.json is written just before its findings.json. Images and findings are
    counted once their study is in place: an image or a study that could not be written is listed
    in ``report.skipped`` instead.
    """
    items = [(g, item) for g, (group, _) in enumerate(studies) for item in group.items]
    if not items:
        return
    remaining = [len(group.items) for group, _ in studies]
    device = next(module.parameters()).device if isinstance(module, torch.nn.Module) else torch.device("cpu")
    loader = DataLoader(
        _ImageLoader([(item.path, item.frame) for _, item in items], image_size, read_config),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=device.type == "cuda",
    )
    writes: deque[Future] = deque()
    finished: list[Future] = []
    collected = {g: [] for g in range(len(studies))} if proposals else None  # ImageProposals per study

    def submit(function: Any, *args: Any) -> Future:
        while len(writes) > 4 * batch_size:  # the writer is behind: wait rather than pile up images
            writes.popleft().result()
        while writes and writes[0].done():
            writes.popleft().result()  # raises what went wrong in the writer
        writes.append(writer_thread.submit(function, *args))
        return writes[-1]

    progress = tqdm(total=len(items), desc="medrpn predict", unit="image", disable=not sys.stderr.isatty())
    with progress, torch.inference_mode(), ThreadPoolExecutor(1, thread_name_prefix="medrpn-write") as writer_thread:
        for samples in loader:
            progress.update(len(samples))
            ok = [s for s in samples if "error" not in s]
            detections = []
            if ok:
                batch = torch.stack([s["pixels"] for s in ok]).to(device, non_blocking=True)
                out = module(batch)
                predicted = out.detections if second_stage is None else second_stage(batch, out)
                detections = [
                    {**{k: v.cpu() for k, v in d.items()}, "proposals": p.cpu(), "proposal_scores": ps.cpu()}
                    for d, p, ps in zip(predicted, out.proposals, out.proposal_scores)
                ]
            results = dict(zip((s["index"] for s in ok), detections))
            for sample in samples:
                g, item = items[sample["index"]]
                writer = studies[g][1]
                if "error" in sample:
                    report.skipped.append((str(item.path), sample["error"]))
                    submit(writer.skip, item.source, sample["error"])
                    print(f"skipped {item.path}: {sample['error']}", flush=True)
                else:
                    image = _findings(item, sample, results[sample["index"]], image_size, model)
                    submit(writer.add, image, sample["display"].numpy(), item.header)
                    if collected is not None:
                        found = results[sample["index"]]
                        scale = fit_scale(image.height, image.width, image_size)
                        collected[g].append(
                            image_proposals(image, found["proposals"], found["proposal_scores"], scale, image_size)
                        )
                remaining[g] -= 1
                if remaining[g] == 0:
                    finished.append(submit(_finish, writer, None if collected is None else collected.pop(g)))
        while writes:
            writes.popleft().result()
    paths = {item.source: str(item.path) for _, item in items}
    for future in finished:
        writer, failure = future.result()
        lost = writer.unwritten + ([(image.source, failure) for _, image in writer.images] if failure else [])
        for source, reason in lost:
            report.skipped.append((paths.get(source, source), reason))
            print(f"skipped {paths.get(source, source)}: {reason}", flush=True)
        if not failure:
            report.studies.append(writer.folder)
            report.written += writer.written
            report.images += len(writer.images)
            report.findings += sum(len(image.findings) for _, image in writer.images)


# Library warnings said in plain words (and without the value that raised them: highdicom's
# person-name warning quotes the patient's name).
_PLAIN_WARNINGS = (
    (
        re.compile("unlikely to represent the intended person name"),
        "a person name in the source DICOM headers has a single component (no '^' between family and "
        "given name); it was copied into the SR and GSPS as it is",
    ),
)


@contextmanager
def _library_warnings_once() -> Iterator[None]:
    """Collects the warnings libraries raise while images are read and outputs written (in every
    thread), and prints each kind once, in plain words where it is known, with how often it came:
    not a UserWarning per study, and no patient name in the log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            counts = Counter(_plain_warning(w) for w in caught)
            for text, n in counts.items():
                print(f"note: {text}" + (f" ({n} times)" if n > 1 else ""), flush=True)


def _plain_warning(caught: warnings.WarningMessage) -> str:
    message = str(caught.message)
    for pattern, text in _PLAIN_WARNINGS:
        if pattern.search(message):
            return text
    return f"{caught.category.__name__} from {Path(caught.filename).name}: {message}"


def _finish(writer: StudyOutputs, proposals: list[ImageProposals] | None) -> tuple[StudyOutputs, str | None]:
    """Put a study's outputs (and ``proposals``, if any) in place: ``(writer, None)``, or ``(writer,
    why not)`` when they could not be written (the folder then does not look complete; the run goes on)."""
    try:
        if proposals is not None:
            analysed = [p for p in proposals if any(p.image is image for _, image in writer.images)]
            write_proposals(writer.staging / PROPOSALS_NAME, analysed, writer.model, writer.study_instance_uid)
        notes = writer.finish()
    except OSError as error:
        return writer, f"the outputs of {writer.folder} could not be written ({error.__class__.__name__}: {error})"
    for note in notes:
        print(f"note: {writer.folder}: {note}", flush=True)
    return writer, None


def _findings(
    item: InputItem, sample: dict[str, Any], detection: dict[str, torch.Tensor], image_size: int, model: ModelInfo
) -> ImageFindings:
    """One image's detections as findings in its original pixels (the square padding holds none)."""
    height, width = sample["display"].shape[:2]
    boxes = clip_boxes_to_image(detection["boxes"] / fit_scale(height, width, image_size), (height, width))
    keep = (
        (detection["scores"] >= model.score_threshold)
        & (boxes[:, 2] - boxes[:, 0] >= 1)
        & (boxes[:, 3] - boxes[:, 1] >= 1)
    )
    findings = make_findings(
        boxes[keep].numpy(),
        detection["scores"][keep].numpy(),
        detection["labels"][keep].numpy(),
        model.class_names,
        sample["spacing"],
    )
    uids = {}
    if item.header is not None:
        keywords = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality")
        uids = {k: str(item.header.get(k) or "") for k in keywords}
    return ImageFindings(
        source=item.source,
        height=height,
        width=width,
        spacing=sample["spacing"],
        findings=findings,
        frame=item.frame,
        uids=uids,
        overlay=item.overlay,
    )
