"""`medrpn serve`: the DICOM node (`medrpn.node.service`) on the command line.

    medrpn serve --ckpt CKPT --output DIR [--inbox DIR] [--ae-title MEDRPN] [--port 11112]
                 [--destination AE@HOST:PORT] [--allowed-ae TITLE ...] [--quiet-seconds 10]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="medrpn serve",
        description="A DICOM node: accepts C-ECHO and C-STORE of images, analyses each study once no image of it "
        "came for --quiet-seconds, writes the outputs of `medrpn predict` and sends the SR and GSPS to --destination "
        "by C-STORE. Received studies wait on disk (--inbox) until delivered, so a restart resumes them.",
    )
    parser.add_argument("--ckpt", required=True, type=Path,
                        help="a 2D checkpoint written by `medrpn fit`, or models:/NAME/VERSION or models:/NAME@ALIAS")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of a models:/ --ckpt (as `medrpn predict`)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the outputs, one subfolder per study")
    parser.add_argument("--inbox", type=Path, default=None,
                        help="folder of received studies not yet delivered (default: OUTPUT/.inbox)")
    parser.add_argument("--ae-title", default="MEDRPN", help="this node's AE title (default MEDRPN)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument("--port", type=int, default=11112, help="port to listen on (default 11112)")
    parser.add_argument("--destination", default=None, metavar="AE@HOST:PORT",
                        help="where to send the SR and GSPS by C-STORE, e.g. ORTHANC@127.0.0.1:4242 (default: none, "
                        "the outputs stay in --output)")
    parser.add_argument("--allowed-ae", nargs="+", default=[], metavar="TITLE",
                        help="calling AE titles allowed to connect (default: any)")
    parser.add_argument("--quiet-seconds", type=float, default=10.0,
                        help="a study is complete once no image of it came for this long (default 10)")
    parser.add_argument("--keep-images", type=Path, default=None, metavar="DIR",
                        help="keep each delivered study's images in DIR (for `medrpn review --input DIR`); default: "
                        "removed once the results are delivered")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="keep findings scoring at least this (default: the checkpoint's operating point)")
    args = parser.parse_args(argv)
    if str(args.ckpt).startswith("models:/"):
        from medrpn.training.registry import with_local_checkpoint

        args = parser.parse_args(with_local_checkpoint(argv))
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: not a TCP port")
    if any(not 0 < len(t) <= 16 for t in [args.ae_title, *args.allowed_ae]):
        parser.error("AE titles have 1 to 16 characters")
    if args.quiet_seconds < 0:
        parser.error("--quiet-seconds must not be negative")
    if not args.ckpt.is_file():
        parser.error(f"--ckpt {args.ckpt}: no such file")
    from medrpn.commands.predict import _is_volume_checkpoint

    if _is_volume_checkpoint(args.ckpt):
        parser.error(f"--ckpt {args.ckpt}: a 3D model; the node serves 2D models so far (use `medrpn predict` on volumes)")

    from medrpn.errors import MedrpnError
    from medrpn.node.delivery import Destination
    from medrpn.node.service import NodeSettings, serve

    try:
        destination = None if args.destination is None else Destination.parse(args.destination)
    except MedrpnError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for library in ("pynetdicom", "highdicom"):  # their INFO lines name DICOM UIDs and internals
        logging.getLogger(library).setLevel(logging.WARNING)
    serve(NodeSettings(
        ckpt=args.ckpt, output=args.output, inbox=args.inbox or args.output / ".inbox", ae_title=args.ae_title,
        host=args.host, port=args.port, destination=destination, allowed_ae_titles=args.allowed_ae,
        quiet_seconds=args.quiet_seconds, score_threshold=args.score_threshold, keep_images=args.keep_images,
    ))
