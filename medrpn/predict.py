"""Findings for new images: a file or a folder tree in, one output folder per study out.

The run, in order:

1. **scan** the input (`medrpn.scan.scan_inputs`): DICOM files are recognised by content (the ``DICM``
   marker) or name (``.dcm``, ``.dicom``, no suffix), their headers read without pixels and grouped
   by StudyInstanceUID (ordered by series and instance number; each frame of a multi-frame file is
   an image). DICOM objects that are not images (structured reports, RT structure sets,
   presentation states...) are noted and skipped; files whose header cannot be read are listed
   with the reason. PNG/JPEG files and NIfTI slices are grouped by the folder they are in.
2. **keep existing outputs**: a study whose output folder already holds medrpn outputs is left
   alone (and not even analysed) unless ``overwrite`` is set.
3. **detect** with the model loaded once, in batches; DataLoader worker processes read and
   transform the next images while the model runs (`num_workers`). An image that cannot be
   decoded is listed with the reason; the run goes on.
4. **write** per study (`medrpn.outputs.study`): overlay PNGs, DICOM SR, GSPS, findings JSON;
   with ``proposals``, also every RPN proposal in ``proposals.json`` (`medrpn.outputs.proposals`),
   for a second stage of the user's own.

The checkpoint carries everything needed (classes, detector settings, input size, how images were
read in training), so no training config is required. The score threshold is, in order: the one
given, the checkpoint's ``operating_point["score_threshold"]`` (chosen on validation data), or
0.5; the findings JSON, SR and GSPS say which. With a second stage (``--second-stage``, a crop
classifier from ``medrpn fit-crops``) the detections are re-scored / re-labelled by it, and its own
operating point (picked on validation data for the re-scored output) replaces the detector's.

The RPN's test-time proposal settings (how many proposals per image, their NMS IoU, mirrored
views) are the checkpoint's unless given (``proposals_per_image``, ``proposal_nms``,
``test_flips``): a candidate generator feeding a second stage of the user's own wants more, and
more overlapping, proposals than the detector was trained to score. Both JSON files record the
settings used and which were changed. Nothing printed names a patient: messages carry file paths
and reasons only.
"""

from __future__ import annotations

import argparse
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.ops import clip_boxes_to_image

from medrpn import __version__
from medrpn.checkpoint_file import read_checkpoint
from medrpn.data.io import ReadConfig, read_image
from medrpn.data.transforms import build_transform, fit_scale
from medrpn.errors import ConfigError, DataError, MedrpnError
from medrpn.model.flip_proposals import FLIP_DIMS
from medrpn.model.rpn import RPNConfig
from medrpn.outputs import ImageFindings, ModelInfo, make_findings
from medrpn.outputs.findings import file_sha256
from medrpn.outputs.overlay import to_display_uint8
from medrpn.outputs.proposals import PROPOSALS_NAME, image_proposals, write_proposals
from medrpn.proposal_settings import (
    CHANGEABLE_PROPOSAL_SETTINGS,
    describe_proposal_settings,
    proposal_changes,
    rpn_settings,
    with_rpn_changes,
)
from medrpn.outputs.study import StudyOutputs, existing_outputs
from medrpn.scan import InputGroup, InputItem, Scan, scan_inputs
from medrpn.second_stage.rescoring import SecondStage, check_classes, load_second_stage
from medrpn.training import LesionDetectionModule

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


def _read_checkpoint(path: Path) -> dict[str, Any]:
    checkpoint = read_checkpoint(path)
    if "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise MedrpnError(f"{path}: not a medrpn checkpoint (no hyper_parameters/state_dict)")
    return checkpoint


def _build_module(checkpoint: dict[str, Any], rpn_changes: dict[str, Any] | None = None) -> LesionDetectionModule:
    """The checkpoint's module in eval mode, with `rpn_changes` (RPNConfig fields) over its RPN settings."""
    module = LesionDetectionModule(**with_rpn_changes(checkpoint["hyper_parameters"], rpn_changes or {}))
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def load_checkpoint(path: str | Path) -> tuple[LesionDetectionModule, dict[str, Any]]:
    """The trained module (eval mode, CPU) and the data settings it was trained with.

    Loaded with `weights_only=True`: a checkpoint can carry tensors and plain data, never code.
    """
    checkpoint = _read_checkpoint(Path(path))
    return _build_module(checkpoint), dict(checkpoint.get("datamodule_hyper_parameters") or {})


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

    Returns:
        A `PredictReport`.
    """
    ckpt, inputs, output = Path(ckpt), Path(inputs), Path(output)
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if inputs.is_dir() and output.resolve() == inputs.resolve():
        raise MedrpnError(f"{output}: the output folder must not be the input folder")
    changes = proposal_changes(proposals_per_image, proposal_nms, test_flips)
    module, model, image_size, read_config = _load(ckpt, score_threshold, changes)
    stage = None if second_stage is None else _load_second_stage(Path(second_stage), module, model, score_threshold)

    scan = scan_inputs(inputs, exclude=output, axis=read_config.axis)
    report = PredictReport(
        skipped=list(scan.skipped), notes=list(scan.notes), ignored=scan.ignored,
        score_threshold=model.score_threshold, threshold_source=model.threshold_source,
    )
    for path, reason in scan.skipped:
        print(f"skipped {path}: {reason}", flush=True)
    for path, note in scan.notes:
        print(f"note: {path}: {note}", flush=True)
    studies = _plan(scan, output, model, overwrite, proposals, report)
    workers = default_num_workers() if num_workers is None else int(num_workers)
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
    ckpt: Path, score_threshold: float | None, rpn_changes: dict[str, Any]
) -> tuple[LesionDetectionModule, ModelInfo, int, ReadConfig]:
    """The module (eval, on the GPU when there is one), its description, input size and read settings."""
    checkpoint = _read_checkpoint(ckpt)
    threshold, source, point = resolve_threshold(checkpoint, score_threshold)
    module = _build_module(checkpoint, rpn_changes).to("cuda" if torch.cuda.is_available() else "cpu")
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
        checkpoint=str(ckpt.resolve()),
        checkpoint_sha256=file_sha256(ckpt),
        class_names=list(module.class_names),
        score_threshold=threshold,
        threshold_source=source,
        operating_point=point,
        proposal_settings=describe_proposal_settings(settings, rpn_changes),
        version=__version__,
    )
    return module, model, int(data_settings.get("image_size", 256)), ReadConfig.parse(data_settings.get("read"))


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
    scan: Scan, output: Path, model: ModelInfo, overwrite: bool, proposals: bool, report: PredictReport
) -> list[tuple[InputGroup, StudyOutputs]]:
    """The groups to analyse, each with its writer; groups with existing outputs are kept unless
    ``overwrite``, which also removes an earlier run's proposals.json when this one writes none."""
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
            if not proposals and (folder / PROPOSALS_NAME).exists():
                (folder / PROPOSALS_NAME).unlink()  # another run's candidates, maybe of another model
                print(f"removed the earlier run's {PROPOSALS_NAME} in {folder} (--proposals writes new ones)", flush=True)
        studies.append((group, StudyOutputs(folder, model, group.study_instance_uid)))
    return studies


def _detect_and_write(
    module: LesionDetectionModule,
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
    study's proposals.json is written just before its findings.json.
    """
    items = [(g, item) for g, (group, _) in enumerate(studies) for item in group.items]
    if not items:
        return
    remaining = [len(group.items) for group, _ in studies]
    device = next(module.parameters()).device
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
    proposal_files: list[Future] = []

    def submit(function: Any, *args: Any) -> Future:
        while len(writes) > 4 * batch_size:  # the writer is behind: wait rather than pile up images
            writes.popleft().result()
        while writes and writes[0].done():
            writes.popleft().result()  # raises what went wrong in the writer
        writes.append(writer_thread.submit(function, *args))
        return writes[-1]

    with torch.inference_mode(), ThreadPoolExecutor(1, thread_name_prefix="medrpn-write") as writer_thread:
        for samples in loader:
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
                    report.images += 1
                    report.findings += len(image.findings)
                    if collected is not None:
                        found = results[sample["index"]]
                        scale = fit_scale(image.height, image.width, image_size)
                        collected[g].append(
                            image_proposals(image, found["proposals"], found["proposal_scores"], scale, image_size)
                        )
                remaining[g] -= 1
                if remaining[g] == 0:
                    if collected is not None:
                        target = writer.folder / PROPOSALS_NAME
                        proposal_files.append(
                            submit(write_proposals, target, collected.pop(g), model, writer.study_instance_uid)
                        )
                    finished.append(submit(_finish, writer))
        while writes:
            writes.popleft().result()
    for future in finished:
        writer = future.result()
        report.studies.append(writer.folder)
        report.written += writer.written
    report.written += [future.result() for future in proposal_files]


def _finish(writer: StudyOutputs) -> StudyOutputs:
    for note in writer.finish():
        print(f"note: {writer.folder}: {note}", flush=True)
    return writer


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


def main(argv: list[str]) -> None:
    """`medrpn predict --ckpt CKPT --input FILE_OR_DIR --output DIR [...]`."""
    parser = argparse.ArgumentParser(
        prog="medrpn predict",
        description="Find lesions in new images. Per DICOM study: findings JSON, DICOM SR (TID 1500), "
        "GSPS and overlay PNGs; per folder of PNG/JPEG/NIfTI images: findings JSON and overlays.",
    )
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by `medrpn fit`")
    parser.add_argument(
        "--input", required=True, type=Path, help="an image file or a folder tree of them (DICOM, PNG, JPEG, NIfTI)"
    )
    parser.add_argument("--output", required=True, type=Path, help="folder for the outputs (one subfolder per study)")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="keep findings scoring at least this (default: the checkpoint's operating point, else 0.5)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="reader processes (default: CPU cores - 1, at most 4; 0: none)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")
    parser.add_argument(
        "--proposals",
        action="store_true",
        help="also write every RPN proposal (original pixels, mm, objectness; no threshold) to proposals.json "
        "per output folder, for a second stage of your own",
    )
    parser.add_argument(
        "--second-stage", type=Path, default=None, metavar="CKPT",
        help="a crop classifier from `medrpn fit-crops` that re-scores / re-labels the detections "
        "(its operating point then sets the default threshold)",
    )
    parser.add_argument(
        "--proposals-per-image", type=int, default=None, metavar="N",
        help="RPN proposals kept per image after NMS (default: the checkpoint's rpn.post_nms_top_n_test); "
        "more for a candidate generator feeding your own second stage",
    )
    parser.add_argument(
        "--proposal-nms", type=float, default=None, metavar="IOU",
        help="NMS IoU of the RPN's proposals (default: the checkpoint's rpn.nms_thresh); higher keeps more "
        "overlapping boxes, which can raise proposal recall (docs/rpn_ablation.md)",
    )
    parser.add_argument(
        "--test-flips", nargs="+", choices=list(FLIP_DIMS), default=None,
        help="also propose on these mirrored copies of each image and merge (default: the checkpoint's "
        "rpn.test_flips); one more backbone pass each",
    )
    args = parser.parse_args(argv)
    predict_files(
        args.ckpt,
        args.input,
        args.output,
        score_threshold=args.score_threshold,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        proposals=args.proposals,
        second_stage=args.second_stage,
        proposals_per_image=args.proposals_per_image,
        proposal_nms=args.proposal_nms,
        test_flips=args.test_flips,
    )
