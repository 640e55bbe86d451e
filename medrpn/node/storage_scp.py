"""The DICOM side of the node: an Application Entity (pynetdicom) that answers C-ECHO and stores
images sent by C-STORE into the `medrpn.node.inbox`.

What a sender gets for what it sends (and the node logs a line, without patient data, and goes on):

* an association from an AE title not among the allowed ones: rejected (A-ASSOCIATE-RJ, "calling
  AE title not recognised");
* an object that is not an image (SR, presentation state, RT structure set...) or an image in a
  transfer syntax medrpn cannot decode: its presentation context is not accepted, so the sender
  is told before sending it;
* a data set that cannot be decoded, or an image object without pixel data: status 0xC210
  ("cannot understand") or 0xA900 ("data set does not match SOP class"); the file is not kept;
* a disk that cannot take the file: 0xA700 ("out of resources"), so the sender keeps it;
* an image stored (flushed to disk first): 0x0000.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from medrpn.node.inbox import Inbox, study_key

LOG = logging.getLogger("medrpn.serve")

# What medrpn's readers decode (pydicom, with pylibjpeg's JPEG, JPEG-LS, JPEG 2000 and RLE plugins).
DECODABLE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
)
IMAGE_STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    c.abstract_syntax for c in AllStoragePresentationContexts if "Image Storage" in UID(c.abstract_syntax).name
)
"""Every storage SOP class of an image (CR, DX, MG, CT, MR, secondary capture, enhanced ...)."""

STORED, OUT_OF_RESOURCES, DOES_NOT_MATCH_SOP_CLASS, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC210


def storage_ae(ae_title: str, inbox: Inbox, allowed_ae_titles: Sequence[str] = ()) -> tuple[AE, list]:
    """The node's Application Entity and its event handlers (for ``AE.start_server``).

    Args:
        ae_title: the node's own AE title.
        inbox: where received images go.
        allowed_ae_titles: calling AE titles accepted; empty: any.
    """
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    for sop_class in IMAGE_STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(DECODABLE_TRANSFER_SYNTAXES))
    ae.require_calling_aet = list(allowed_ae_titles)
    ae.maximum_pdu_size = 0  # no limit: images of a study come in large PDUs
    handlers = [
        (evt.EVT_C_STORE, _store, [inbox]),
        (evt.EVT_REJECTED, _rejected),
        (evt.EVT_ACCEPTED, _accepted),
    ]
    return ae, handlers


def _store(event: evt.Event, inbox: Inbox) -> int:
    """C-STORE: check the data set decodes and is an image, then write it to the inbox."""
    calling = event.assoc.requestor.ae_title
    try:
        dataset = event.dataset
        study_uid = str(dataset.StudyInstanceUID)
        sop_uid = str(dataset.SOPInstanceUID)
    except Exception as error:  # noqa: BLE001 - whatever the decoder raises, the sender gets a status
        LOG.warning("C-STORE from %s refused: the data set cannot be decoded (%s)", calling, type(error).__name__)
        return CANNOT_UNDERSTAND
    if not any(k in dataset for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        LOG.warning("C-STORE from %s refused: an image SOP class without pixel data (study %s)", calling, study_key(study_uid))
        return DOES_NOT_MATCH_SOP_CLASS
    try:
        inbox.store(study_uid, sop_uid, event.encoded_dataset(include_meta=True))
    except OSError as error:
        LOG.error("C-STORE from %s not stored: %s (study %s)", calling, error.strerror or error, study_key(study_uid))
        return OUT_OF_RESOURCES
    LOG.info("stored an image of study %s from %s", study_key(study_uid), calling)
    return STORED


def _rejected(event: evt.Event) -> None:
    LOG.warning("association from AE title %r at %s refused (not an allowed calling AE title)",
                event.assoc.requestor.ae_title, event.assoc.requestor.address)


def _accepted(event: evt.Event) -> None:
    refused = list(event.assoc.rejected_contexts)
    if refused:  # a PACS offers every storage class it knows: usual, so not a warning
        LOG.info(
            "association from %s: %d presentation context(s) refused (not an image, or a transfer syntax medrpn "
            "cannot decode): %s", event.assoc.requestor.ae_title, len(refused),
            ", ".join(sorted({UID(c.abstract_syntax).name for c in refused})),
        )
