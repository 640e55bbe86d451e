"""Helpers of `bench/compare_detectors.py`: one file per detector family, plus the shared parts.

- `system.py`: the small interface every detector is wrapped in (losses, predictions, proposals);
- `medrpn_system.py`, `torchvision_system.py`, `monai_system.py`: the systems compared;
- `split.py`: the contiguous-block train/validation split file;
- `data.py`: the one medrpn data pipeline every system is fed from;
- `loop.py`: the training loop (same optimiser, schedule and budget for all);
- `measure.py`: evaluation with medrpn's metrics, inference speed, memory, machine;
- `run.py`: one system from start to finish, in its own process;
- `report.py`: results.json and results.md.
"""
