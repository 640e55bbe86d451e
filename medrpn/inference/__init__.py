"""Running a trained detector on new scans: what `medrpn predict` does between its command line
(`medrpn.commands.predict`) and the writers (`medrpn.outputs`).

- `scan`: what is in the input (files or folder trees, grouped into studies).
- `predict`: the engine (read, resize, detect, write findings, overlays, SR and GSPS per study).
- `proposal_settings`: the RPN settings a run may change at prediction time.
"""
