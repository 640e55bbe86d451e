"""`medrpn serve`: receive studies, analyse each once it is quiet, send the findings back.

The loop, once a second: every study in the inbox whose last image arrived at least the quiet
time ago is analysed with `medrpn.inference.predict.predict_files` (the same outputs as `medrpn
predict`: findings JSON, overlays, SR, GSPS, in the output folder), then its SR and GSPS are sent
to the destination by C-STORE, and only then are its images removed from the inbox. A destination
that is away keeps the study in the inbox (analysed) and it is tried again, at growing intervals up
to a minute, without analysing it again; a restarted node takes up whatever the inbox holds. A
study none of whose images can be read is moved aside (``.unreadable`` in the inbox folder), logged
and not tried again. The log names studies by `medrpn.node.inbox.study_key`, never by patient.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from medrpn.node.delivery import DeliveryError, Destination, send_files
from medrpn.node.inbox import Inbox, QueuedStudy
from medrpn.node.storage_scp import storage_ae

LOG = logging.getLogger("medrpn.serve")
UNREADABLE = ".unreadable"
MAX_RETRY_SECONDS = 60.0


@dataclass
class NodeSettings:
    """What `serve` needs: the model, the DICOM identity and where things go.

    Attributes:
        ckpt: the checkpoint (2D detector), or a model exported by `medrpn export` (.onnx).
        output: folder for every study's outputs (one subfolder per study, as `medrpn predict`).
        inbox: folder of received studies not yet delivered.
        ae_title, host, port: the node's own AE title and where it listens.
        destination: where SR and GSPS go by C-STORE; None: they stay in ``output`` only.
        allowed_ae_titles: calling AE titles accepted; empty: any.
        quiet_seconds: a study is analysed once no image of it came for this long.
        score_threshold: as `medrpn predict`'s (None: the checkpoint's operating point).
        keep_images: where a delivered study's images go (one folder per study, as in the inbox),
            e.g. for `medrpn review --input`; None: they are removed (the PACS has them).
    """

    ckpt: Path
    output: Path
    inbox: Path
    ae_title: str = "MEDRPN"
    host: str = "0.0.0.0"
    port: int = 11112
    destination: Destination | None = None
    allowed_ae_titles: list[str] = field(default_factory=list)
    quiet_seconds: float = 10.0
    score_threshold: float | None = None
    keep_images: Path | None = None


def serve(settings: NodeSettings, stop: threading.Event | None = None) -> None:
    """Run the node until ``stop`` is set, or SIGTERM / SIGINT (in the main thread)."""
    # torch: only once the settings are sound
    from medrpn.inference.onnx_model import OnnxDetector, is_onnx
    from medrpn.inference.predict import load_checkpoint

    # a model that does not load stops the node before it listens
    _ = OnnxDetector(settings.ckpt) if is_onnx(settings.ckpt) else load_checkpoint(settings.ckpt)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    inbox = Inbox(settings.inbox)
    ae, handlers = storage_ae(settings.ae_title, inbox, settings.allowed_ae_titles)
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers)
    LOG.info(
        "medrpn serve: %s listening on %s:%d; %d studies waiting in the inbox; results to %s",
        settings.ae_title, settings.host, settings.port, len(inbox.studies()),
        settings.destination or f"{settings.output} only",
    )
    retry: dict[str, tuple[float, float]] = {}  # study key -> (not before, interval)
    try:
        while not stop.is_set():
            for study in inbox.ready(settings.quiet_seconds):
                if stop.is_set():
                    break
                not_before, interval = retry.get(study.key, (0.0, 1.0))
                if time.time() < not_before:
                    continue
                try:
                    _handle(study, inbox, settings)
                    retry.pop(study.key, None)
                except DeliveryError as error:
                    LOG.warning("study %s: results not delivered (%s); trying again in %.0f s", study.key, error, interval)
                    retry[study.key] = (time.time() + interval, min(2 * interval, MAX_RETRY_SECONDS))
            stop.wait(1.0)
    finally:
        server.shutdown()
        LOG.info("medrpn serve: stopped; %d studies wait in the inbox for the next start", len(inbox.studies()))


def _handle(study: QueuedStudy, inbox: Inbox, settings: NodeSettings) -> None:
    """Analyse ``study`` unless that is done, deliver its results, then forget its images."""
    if study.results is None:
        results = _analyse(study, settings)
        if results is None:
            return
        study = inbox.mark_analysed(study, results)
        if study.results is None:
            LOG.info("study %s: more images arrived during the analysis; analysing again once quiet", study.key)
            return
    files = [study.results / "sr.dcm", *sorted(study.results.glob("gsps*.dcm"))]
    files = [f for f in files if f.is_file()]
    if settings.destination is not None:
        send_files(files, settings.destination, settings.ae_title)
        LOG.info("study %s: %d result file(s) stored at %s", study.key, len(files), settings.destination)
    if not inbox.remove(study, settings.keep_images):
        LOG.info("study %s: more images arrived; analysing again with them once quiet", study.key)


def _analyse(study: QueuedStudy, settings: NodeSettings) -> Path | None:
    """The study's output folder once `predict_files` has written it; None when no image could be
    read (the study is then moved aside)."""
    from medrpn.inference.predict import predict_files

    report = predict_files(
        settings.ckpt, study.folder, settings.output, score_threshold=settings.score_threshold,
        num_workers=0, overwrite=True,
    )
    if not report.studies:
        aside = inbox_aside(study)
        LOG.error("study %s: no image could be analysed (%d skipped); moved to %s", study.key, len(report.skipped), aside)
        return None
    LOG.info("study %s: %d image(s) analysed, %d finding(s)", study.key, report.images, report.findings)
    return report.studies[0]


def inbox_aside(study: QueuedStudy) -> Path:
    """Move a study that cannot be analysed out of the queue, into ``<inbox>/.unreadable/``."""
    aside = study.folder.parent / UNREADABLE / study.folder.name
    aside.parent.mkdir(exist_ok=True)
    shutil.rmtree(aside, ignore_errors=True)
    study.folder.replace(aside)
    return aside
