"""Reading scans and annotations into images and records; batching them for a detector.

Nothing here imports `medrpn.model`: the batch format in `medrpn.data.batch` is the one contract.
"""
