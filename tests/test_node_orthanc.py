"""medrpn serve against a real PACS: Orthanc (Debian's `orthanc`, installed by `make test` where
apt-get can) started on loopback ports with a throwaway configuration and storage folder. Orthanc
sends studies to the node by C-STORE (its REST call /modalities/medrpn/store, as a user's "send to"
does), the node (on the model exported to ONNX) sends its SR and GSPS back, and they are read back
through Orthanc's REST API."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from medrpn.data.synth import write_synthetic_dataset
from test_node import free_port, start_node, stop_node
from trained_run import TrainedRun, trained_run

pytestmark = [
    pytest.mark.filterwarnings("ignore"),
    pytest.mark.skipif(shutil.which("Orthanc") is None,
                       reason="Debian's orthanc package is not installed (make test installs it where apt-get can)"),
]


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory) -> TrainedRun:
    return trained_run(request, tmp_path_factory)


class Orthanc:
    """An Orthanc process of its own: DICOM and HTTP on free loopback ports, storage in ``folder``."""

    def __init__(self, folder: Path, node_port: int) -> None:
        self.dicom_port, http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{http_port}"
        config = {
            "Name": "medrpn-test", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
            "DicomAet": "ORTHANC", "DicomPort": self.dicom_port, "HttpPort": http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
            "DicomModalities": {"medrpn": ["MEDRPN", "127.0.0.1", node_port]},
            "DicomCheckCalledAet": True,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = folder / "orthanc.log"
        self.process = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")], stdout=self.log.open("w"),
                                        stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if requests.get(f"{self.url}/system", timeout=2).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.25)
        raise AssertionError("Orthanc did not start: " + self.log.read_text()[-3000:])

    def get(self, path: str):
        response = requests.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json() if "json" in response.headers.get("content-type", "") else response.content

    def upload(self, path: Path) -> str:
        """Store a DICOM file in Orthanc; its study's Orthanc id."""
        response = requests.post(f"{self.url}/instances", data=path.read_bytes(), timeout=30)
        response.raise_for_status()
        return response.json()["ParentStudy"]

    def send_to_node(self, study: str) -> None:
        response = requests.post(f"{self.url}/modalities/medrpn/store", data=study, timeout=120)
        response.raise_for_status()

    def results(self, study: str) -> dict[str, list[pydicom.Dataset]]:
        """The study's instances by modality (SR, PR, DX...), read back as DICOM."""
        found: dict[str, list[pydicom.Dataset]] = {}
        for series in self.get(f"/studies/{study}/series"):
            for instance in series["Instances"]:
                data = self.get(f"/instances/{instance}/file")
                dataset = pydicom.dcmread(io.BytesIO(data))
                found.setdefault(str(dataset.Modality), []).append(dataset)
        return found

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def pacs_and_node(trained, tmp_path_factory):
    """Orthanc, and a node serving the trained model exported to ONNX (run by ONNX Runtime; the
    node on the PyTorch checkpoint is in test_node.py)."""
    from medrpn.inference.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("orthanc")
    model = export_onnx(trained.ckpt, folder / "detector.onnx").path
    node_port = free_port()
    orthanc = Orthanc(folder, node_port)
    work = folder / "node"
    work.mkdir()
    node = None
    try:
        node = start_node(model, work, node_port, orthanc.dicom_port, pacs_ae="ORTHANC", allowed=("ORTHANC",))
        yield orthanc, node, work
    finally:
        if node is not None:
            stop_node(node)
        orthanc.stop()


def _studies(folder: Path, n_images: int, seed: int) -> dict[str, list[Path]]:
    write_synthetic_dataset(folder, n_images=n_images, image_size=64, seed=seed)
    studies: dict[str, list[Path]] = {}
    for path in sorted((folder / "images").glob("*.dcm")):
        studies.setdefault(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID), []).append(path)
    return studies


def _wait(condition, seconds: float, what: str, logs: list[Path]) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {seconds} s:\n" + "\n".join(p.read_text()[-2500:] for p in logs))


def test_orthanc_sends_a_study_and_gets_the_sr_and_gsps_back(pacs_and_node, tmp_path):
    orthanc, node, work = pacs_and_node
    studies = _studies(tmp_path / "data", 6, seed=21)
    uid, files = max(studies.items(), key=lambda kv: len(kv[1]))
    study = {orthanc.upload(path) for path in files}.pop()
    orthanc.send_to_node(study)
    logs = [work / "node.log", orthanc.log]
    _wait(lambda: list((work / "out").glob(f"{uid}*/findings.json")), 120, "the study analysed", logs)
    [output] = [p.parent for p in (work / "out").glob(f"{uid}*/findings.json")]
    states = len(list(output.glob("gsps*.dcm")))
    _wait(lambda: len(orthanc.results(study).get("PR", [])) == states and "SR" in orthanc.results(study), 120,
          f"the SR and {states} GSPS in Orthanc", logs)
    found = orthanc.results(study)
    [sr] = found["SR"]
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    assert sr.StudyInstanceUID == uid
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence for series in s.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert evidence == sent
    shown = {i.ReferencedSOPInstanceUID for state in found["PR"] for s in state.ReferencedSeriesSequence
             for i in s.ReferencedImageSequence}
    assert shown and shown <= sent
    findings = json.loads((output / "findings.json").read_text())
    boxes = sorted(tuple(f["box_px"]) for image in findings["images"] for f in image["findings"])
    tracking = {f["tracking_uid"] for image in findings["images"] for f in image["findings"]}
    assert boxes and tracking <= {str(e.value) for e in sr.iterall() if e.keyword == "UID"}
    drawn = sorted(  # every box is drawn in a GSPS, as the closed polyline of its corners
        tuple(float(v) for v in (g.GraphicData[0], g.GraphicData[1], g.GraphicData[4], g.GraphicData[5]))
        for state in found["PR"] for annotation in state.GraphicAnnotationSequence
        for g in getattr(annotation, "GraphicObjectSequence", [])
    )
    assert len(drawn) == len(boxes) and np.allclose(drawn, boxes, atol=0.01)


def test_twenty_studies_sent_at_once_are_all_answered(pacs_and_node, tmp_path):
    orthanc, node, work = pacs_and_node
    studies = _studies(tmp_path / "data", 44, seed=33)
    ids = list(dict.fromkeys(orthanc.upload(p) for files in studies.values() for p in files))[:20]
    assert len(ids) == 20
    with ThreadPoolExecutor(20) as pool:  # 20 "send to" at once: 20 associations to the node together
        list(pool.map(orthanc.send_to_node, ids))
    _wait(lambda: all("SR" in orthanc.results(s) for s in ids), 300, "an SR for each of the 20 studies",
          [work / "node.log", orthanc.log])
    _wait(lambda: not [p for p in (work / "inbox").iterdir() if not p.name.startswith(".")], 60,
          "the inbox emptied", [work / "node.log"])
    peak = next(line for line in Path(f"/proc/{node.pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    assert int(peak.split()[1]) < 3 * 1024 * 1024, f"the node's peak memory: {peak}"
    assert "not delivered" not in (work / "node.log").read_text()
