"""medrpn: a two-stage lesion detector (FPN + Region Proposal Network + RoI classifier) for medical images.

Where things are, in the order data flows (each package's docstring says more):

- `data`: reading scans (DICOM, NIfTI, PNG/JPEG/TIFF) and annotations into records, splits,
  augmentation and batches; the synthetic demo dataset. Knows nothing of the model.
- `model`: the detector in plain PyTorch (backbone + FPN, anchors, RPN, RoI heads).
- `second_stage`: the optional crop classifier that re-scores the detector's findings.
- `metrics`: FROC / CPM, mAP, proposal recall, bootstrap intervals, the plots.
- `outputs`: findings JSON, overlays, DICOM SR and GSPS.
- `inference`: running a checkpoint on new scans (`medrpn predict`'s engine).
- `training`: Lightning and MLflow: the LightningModule, the CLI wiring, callbacks, tracking.
- `commands`: one thin module per `medrpn` subcommand; `cli` dispatches to them.
"""

from medrpn import moved_modules

__version__ = "0.1.0"

moved_modules.install()
