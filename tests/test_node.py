"""`medrpn serve`, the DICOM node, as a PACS meets it: a real `medrpn serve` process, studies sent
to it by C-STORE (pynetdicom, as a modality or PACS would), results received by a storage SCP
standing in for the PACS, and the node stopped and started again in between."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from trained_run import TrainedRun, trained_run

from medrpn.data.synth import write_synthetic_dataset

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory) -> TrainedRun:
    return trained_run(request, tmp_path_factory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def study_files(folder: Path) -> list[Path]:
    """The largest study of a small synthetic DX dataset."""
    write_synthetic_dataset(folder, n_images=8, image_size=96, seed=5)
    studies: dict[str, list[Path]] = {}
    for path in sorted((folder / "images").glob("*.dcm")):
        studies.setdefault(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID, []).append(path)
    files = max(studies.values(), key=len)
    assert len(files) >= 2
    return files


class Pacs:
    """A storage SCP (pynetdicom) standing in for the PACS: keeps every data set sent to it."""

    def __init__(self, port: int) -> None:
        self.received: list[pydicom.Dataset] = []
        ae = AE(ae_title="PACS")
        ae.add_supported_context(Comprehensive3DSRStorage, [ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
        ae.add_supported_context(GrayscaleSoftcopyPresentationStateStorage, [ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        self.received.append(dataset)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def start_node(
    ckpt: Path, work: Path, port: int, pacs_port: int, quiet: float = 1.0, pacs_ae: str = "PACS",
    allowed: tuple[str, ...] = ("SENDER", "MODALITY"),
) -> subprocess.Popen:
    """A `medrpn serve` process sending to ``pacs_ae`` on ``pacs_port``, once it answers C-ECHO."""
    command = [
        sys.executable, "-m", "medrpn", "serve", "--ckpt", str(ckpt), "--output", str(work / "out"),
        "--inbox", str(work / "inbox"), "--host", "127.0.0.1", "--port", str(port), "--ae-title", "MEDRPN",
        "--destination", f"{pacs_ae}@127.0.0.1:{pacs_port}", "--allowed-ae", *allowed, "SENDER",
        "--quiet-seconds", str(quiet), "--score-threshold", "0", "--keep-images", str(work / "kept"),
    ]
    log = open(work / "node.log", "a")  # noqa: SIM115 - closed with the process
    node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:  # until it answers C-ECHO
        assert node.poll() is None, (work / "node.log").read_text()[-3000:]
        assoc = sender().associate("127.0.0.1", port, ae_title="MEDRPN")
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            assert status.Status == 0x0000
            return node
        time.sleep(0.5)
    node.kill()
    raise AssertionError("the node did not answer C-ECHO: " + (work / "node.log").read_text()[-3000:])


def sender(ae_title: str = "SENDER", contexts=()) -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    for sop_class in contexts:
        ae.add_requested_context(sop_class)
    return ae


def stop_node(node: subprocess.Popen) -> None:
    node.send_signal(signal.SIGTERM)
    assert node.wait(timeout=60) == 0


def wait_for(condition, seconds: float, what: str, log: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"{what} not within {seconds} s; node log:\n" + log.read_text()[-4000:])


def test_a_study_sent_to_the_node_comes_back_as_sr_and_gsps_even_across_a_restart(trained, tmp_path):
    files = study_files(tmp_path / "data")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    port, pacs_port = free_port(), free_port()
    log = tmp_path / "node.log"
    node = start_node(trained.ckpt, tmp_path, port, pacs_port)  # the PACS is not up yet
    try:
        # an AE title not allowed is refused at association
        assoc = sender("INTRUDER").associate("127.0.0.1", port, ae_title="MEDRPN")
        assert assoc.is_rejected and not assoc.is_established
        # a non-image object is refused before it is sent; a data set that cannot be decoded gets 0xC210
        ae = sender(contexts=[Comprehensive3DSRStorage, headers[0].SOPClassUID])
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDRPN")
        assert assoc.is_established
        accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
        assert Comprehensive3DSRStorage not in accepted and headers[0].SOPClassUID in accepted
        broken = pydicom.dcmread(files[0])
        broken.SOPInstanceUID = pydicom.uid.generate_uid()
        del broken.PixelData  # an image object without its pixels
        assert assoc.send_c_store(broken).Status == 0xA900
        for path in files:  # the study, as a modality sends it
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
        assoc.release()
        # analysed once quiet; the PACS is away, so the results wait in the inbox
        wait_for(lambda: "results not delivered" in log.read_text(), 120, "a delivery attempt", log)
        out_folders = [p for p in (tmp_path / "out").iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert len(out_folders) == 1 and (out_folders[0] / "findings.json").is_file()
    finally:
        stop_node(node)
    assert [p for p in (tmp_path / "inbox").iterdir() if not p.name.startswith(".")], "the study stays in the inbox"

    pacs = Pacs(pacs_port)
    node = start_node(trained.ckpt, tmp_path, port, pacs_port)
    try:
        wait_for(lambda: len(pacs.received) >= 2, 120, "the SR and GSPS at the PACS", log)
        wait_for(lambda: not [p for p in (tmp_path / "inbox").iterdir() if not p.name.startswith(".")], 30,
                 "the inbox emptied after delivery", log)
    finally:
        stop_node(node)
        pacs.stop()
    text = log.read_text()
    assert text.count("image(s) analysed") == 1, "the restarted node delivers without analysing again"
    kept = sorted(p.name for p in (tmp_path / "kept").rglob("*.dcm"))  # --keep-images: for medrpn review
    assert kept == sorted(f"{h.SOPInstanceUID}.dcm" for h in headers)
    for header in headers:  # no patient data in the log
        assert str(header.PatientName) not in text and str(header.PatientID) not in text

    by_class = {str(ds.SOPClassUID): ds for ds in pacs.received}
    sr, gsps = by_class[Comprehensive3DSRStorage], by_class[GrayscaleSoftcopyPresentationStateStorage]
    sent = {str(h.SOPInstanceUID) for h in headers}
    evidence = {
        i.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert evidence == sent and sr.StudyInstanceUID == headers[0].StudyInstanceUID
    shown = {i.ReferencedSOPInstanceUID for s in gsps.ReferencedSeriesSequence for i in s.ReferencedImageSequence}
    assert shown <= sent and shown
    findings = json.loads((out_folders[0] / "findings.json").read_text())
    tracking = {f["tracking_uid"] for image in findings["images"] for f in image["findings"]}
    in_sr = {str(element.value) for element in sr.iterall() if element.keyword == "UID"}  # TID 4108 tracking UIDs
    assert tracking and tracking <= in_sr


def test_the_storage_scp_keeps_images_durably_and_answers_bad_input_with_a_status(tmp_path):
    """The node's AE in this process (no model): what a sender gets back, and what reaches the inbox."""
    from pynetdicom import _config

    from medrpn.node.inbox import Inbox, study_key
    from medrpn.node.storage_scp import storage_ae

    files = study_files(tmp_path / "data")
    inbox = Inbox(tmp_path / "inbox")
    ae, handlers = storage_ae("MEDRPN", inbox)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    image = pydicom.dcmread(files[0])
    corrupt = tmp_path / "corrupt.dcm"  # a valid file meta, then bytes that are no data set
    meta_end = 132 + 12 + image.file_meta.FileMetaInformationGroupLength
    corrupt.write_bytes(files[0].read_bytes()[:meta_end] + b"\x08\x00\x05\x00CS\xff\xff" + b"\x00" * 64)
    try:
        ae = sender("ANY", contexts=[image.SOPClassUID])
        ae.add_requested_context(image.SOPClassUID, ExplicitVRLittleEndian)  # the file's own, for the raw send
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDRPN")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(image).Status == 0x0000
        _config.STORE_SEND_CHUNKED_DATASET = True  # sent from the file as it is, not decoded first
        try:
            assert assoc.send_c_store(corrupt).Status == 0xC210
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    finally:
        server.shutdown()
    [study] = inbox.studies()
    assert study.key == study_key(str(image.StudyInstanceUID)) and study.results is None
    [stored] = list(study.folder.glob("*.dcm"))
    assert stored.name == f"{image.SOPInstanceUID}.dcm"
    kept = pydicom.dcmread(stored)
    assert kept.SOPInstanceUID == image.SOPInstanceUID and kept.PixelData == image.PixelData
    assert not list(study.folder.glob(".*")), "no temporary file left behind"
    assert inbox.ready(quiet_seconds=3600) == [] and inbox.ready(quiet_seconds=0) == [study]
