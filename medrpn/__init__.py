"""medrpn: a two-stage lesion detector (FPN + Region Proposal Network + RoI classifier) for medical images."""

__version__ = "0.1.0"
