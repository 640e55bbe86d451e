"""`medrpn review`: the findings of a real `medrpn predict` run shown for review, marks saved as an
annotation CSV that medrpn's reader takes, through the server and through a real browser (Debian's
chromium, headless, driven over the DevTools protocol: page load, a click on "confirm",
a screenshot)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from trained_run import TrainedRun, trained_run

from medrpn.data.synth import write_synthetic_dataset

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory) -> TrainedRun:
    return trained_run(request, tmp_path_factory)


@pytest.fixture
def predicted(trained, tmp_path) -> tuple[Path, Path]:
    """(findings folder, input folder) of predict on 4 synthetic DICOM images, threshold 0.05."""
    from medrpn.inference.predict import predict_files

    write_synthetic_dataset(tmp_path / "data", n_images=4, image_size=128, seed=3)
    inputs = tmp_path / "data" / "images"
    report = predict_files(trained.ckpt, inputs, tmp_path / "findings", score_threshold=0.05, num_workers=0)
    assert report.findings >= 2
    return tmp_path / "findings", inputs


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(session):
    from medrpn.review.server import review_server

    server = review_server(session, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_marks_become_an_annotation_csv_that_medrpn_reads(predicted):
    from medrpn.data.annotations import read_annotations
    from medrpn.review.session import ReviewSession

    findings, inputs = predicted
    session = ReviewSession(findings, inputs)
    listing = session.listing()
    images = [im for study in listing["studies"] for im in study["images"] if len(im["findings"]) >= 2]
    image = images[0]
    source = pydicom.dcmread(inputs / image["source"])
    assert image["adjustable"] and image["window"][0] == pytest.approx(float(source.WindowCenter))
    # the source at two windows: two renderings of the image's own size
    narrow, wide = (Image.open(io.BytesIO(session.render(image["key"], c, w))) for c, w in ((image["window"][0], 10), (image["window"][0], 4000)))
    assert narrow.size == wide.size == (image["width"], image["height"])
    assert np.asarray(narrow).std() > np.asarray(wide).std()
    # wrong marks are refused; all findings of the image marked: it enters the CSV
    first, second, *rest = image["findings"]
    other = next(c for c in listing["class_names"] if c != second["label"])
    with pytest.raises(ValueError, match="one of confirmed"):
        session.mark(first["key"], "maybe")
    with pytest.raises(ValueError, match="give the right class"):
        session.mark(second["key"], "wrong_type", second["label"])
    session.mark(first["key"], "confirmed")
    assert str(inputs / image["source"]) not in (findings / "review" / "reviewed.csv").read_text()  # not all marked yet
    session.mark(second["key"], "wrong_type", other)
    for finding in rest:
        session.mark(finding["key"], "rejected")
    records, classes = read_annotations(findings / "review" / "reviewed.csv", class_names=listing["class_names"])
    [record] = records
    assert Path(record.image_path).resolve() == (inputs / image["source"]).resolve()
    assert np.allclose(record.boxes, [first["box_px"], second["box_px"]])
    assert [classes[k] for k in record.labels] == [first["label"], other]
    # the marks survive a new session (a reader comes back to it)
    again = ReviewSession(findings, inputs).listing()
    marked = {f["key"]: f["mark"]["mark"] for s in again["studies"] for im in s["images"] for f in im["findings"] if f["mark"]}
    assert marked[first["key"]] == "confirmed" and marked[second["key"]] == "wrong_type" and len(marked) == 2 + len(rest)


def test_the_server_answers_the_page_and_refuses_a_bad_mark(predicted):
    from medrpn.review.session import ReviewSession

    findings, inputs = predicted
    server, url = _serve(ReviewSession(findings, inputs))
    try:
        page = urllib.request.urlopen(url + "/").read().decode()
        assert "<title>medrpn review</title>" in page and "http" not in page.split("<script>")[1].split("fetch(")[0]
        request = urllib.request.Request(url + "/api/marks", data=b'{"key": "nowhere|9|9", "mark": "confirmed"}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request)
        assert refused.value.code == 400
    finally:
        server.shutdown()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (make test installs it where apt-get can)")
def test_a_reader_confirms_a_finding_in_headless_chromium(predicted, tmp_path):
    websocket = pytest.importorskip("websocket", reason="websocket-client (dev extra) drives the browser")
    from medrpn.review.session import ReviewSession

    findings, inputs = predicted
    server, url = _serve(ReviewSession(findings, inputs))
    port = _port()
    browser = subprocess.Popen(
        [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,800", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        target = None
        while target is None and time.time() < deadline:
            try:
                pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
                target = next(p for p in pages if p["type"] == "page")
            except (OSError, StopIteration):
                time.sleep(0.3)
        assert target is not None, "chromium did not open its DevTools port"
        tab = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=30)
        calls = iter(range(1, 10**6))

        def call(method: str, **params):
            number = next(calls)
            tab.send(json.dumps({"id": number, "method": method, "params": params}))
            while True:
                message = json.loads(tab.recv())
                if message.get("id") == number:
                    assert "error" not in message, message
                    return message["result"]

        def until(expression: str, seconds: float = 30) -> None:
            end = time.time() + seconds
            while time.time() < end:
                if call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value"):
                    return
                time.sleep(0.2)
            raise AssertionError(f"not true in the page within {seconds} s: {expression}")

        call("Page.navigate", url=url + "/")
        until("document.querySelectorAll('#findings .finding').length > 0 && document.getElementById('picture').complete "
              "&& document.getElementById('picture').naturalWidth > 0")
        call("Runtime.evaluate", expression="document.querySelector('#findings .finding .confirm').click()")
        until("document.querySelector('#findings .finding').classList.contains('confirmed')")
        shot = Image.open(io.BytesIO(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))).convert("RGB")
        shot.save(tmp_path / "screenshot.png")  # kept when the test fails
        tab.close()
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        server.shutdown()
    marks = json.loads((findings / "review" / "marks.json").read_text())
    assert [m["mark"] for m in marks.values()] == ["confirmed"]
    pixels = np.asarray(shot).reshape(-1, 3).astype(int)
    green = np.abs(pixels - [0x33, 0xCC, 0x33]).max(axis=1) <= 12  # the confirmed box, drawn over the image
    image_area = np.abs(pixels - [0x11, 0x11, 0x11]).max(axis=1) > 12
    assert green.sum() > 20 and image_area.mean() > 0.05, (green.sum(), image_area.mean())
