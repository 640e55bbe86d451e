"""`medrpn review`: the review page (`medrpn.review`) for a findings folder, on a local server.

    medrpn review --findings DIR [--input SCANS] [--port 8765] [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="medrpn review",
        description="A page to review what `medrpn predict` flagged: each finding drawn on its image (window adjustable "
        "for DICOM), marked confirmed, rejected or of another type. The marks are saved as they are made, in "
        "FINDINGS/review/marks.json and as an annotation CSV that `medrpn fit` reads (FINDINGS/review/reviewed.csv).",
    )
    parser.add_argument("--findings", required=True, type=Path, help="the folder `medrpn predict --output` wrote")
    parser.add_argument("--input", type=Path, default=None,
                        help="the folder predict read (to render the sources at any window; without it the overlays are shown)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    args = parser.parse_args(argv)
    from medrpn.errors import MedrpnError
    from medrpn.review.server import review_server
    from medrpn.review.session import ReviewSession

    try:
        session = ReviewSession(args.findings, args.input)
    except MedrpnError as error:
        parser.error(str(error))
    server = review_server(session, args.host, args.port)
    print(f"medrpn review: http://{args.host}:{server.server_address[1]}/  ({len(session.images)} images; "
          f"marks in {session.folder}); Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
