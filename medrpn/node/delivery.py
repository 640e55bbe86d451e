"""Results back to the PACS: a study's SR and GSPS files sent by C-STORE to the destination AE."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from medrpn.errors import ConfigError, MedrpnError

# Status codes a C-STORE SCP answers that mean "stored": success and the three warnings.
STORED_STATUSES = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}


class DeliveryError(MedrpnError):
    """The destination could not be reached or did not store a file; the study is kept and tried again."""


@dataclass(frozen=True)
class Destination:
    """A DICOM node to send results to: AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE_TITLE@HOST:PORT``, e.g. ``ORTHANC@pacs.example.org:4242``."""
        match = re.fullmatch(r"([^@]{1,16})@(.+):(\d{1,5})", text.strip())
        if not match or not 0 < int(match.group(3)) < 65536:
            raise ConfigError(f"destination {text!r}: expected AE_TITLE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
        return cls(match.group(1), match.group(2), int(match.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def send_files(paths: Sequence[Path], destination: Destination, ae_title: str, timeout: float = 30.0) -> None:
    """C-STORE ``paths`` (DICOM files) to ``destination`` in one association, as ``ae_title``.

    Raises:
        DeliveryError: the association was not accepted, or a file was not stored.
    """
    if not paths:
        return
    datasets = [pydicom.dcmread(path) for path in paths]
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"{destination}: no association (not reachable, or it refused {ae_title})")
    try:
        for path, dataset in zip(paths, datasets):
            status = assoc.send_c_store(dataset)
            code = getattr(status, "Status", None)
            if code not in STORED_STATUSES:
                answer = "no answer" if code is None else f"status 0x{code:04X}"
                raise DeliveryError(f"{destination} did not store {path.name} ({answer})")
    finally:
        assoc.release()
