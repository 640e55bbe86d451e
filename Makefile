# Two entry points that work on a fresh machine with Python 3.10+ (see README):
#   make demo   set up, generate demo DICOM data, train, evaluate, predict on new scans
#   make test   set up and run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-volumes test test-lowest setup conformance-tools clean-demo

# The project's own modules are compiled once here: an editable install leaves them uncompiled, and
# where PYTHONDONTWRITEBYTECODE is set (as on CI's machines) every process would compile them again:
# up to 0.7 s of each `medrpn` command the tests start (against 10-13 s of importing torch and Lightning).
setup: $(VENV)/.installed
	@$(BIN)/python -m compileall -q medrpn bench tests

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/medrpn synth --out demo/data --n-images 400 --seed 0
	$(BIN)/medrpn synth --out demo/new_scans --n-images 8 --seed 1000
	$(BIN)/medrpn fit --config configs/demo.yaml
	$(BIN)/medrpn predict --ckpt demo/checkpoints/best.ckpt --input demo/new_scans/images --output demo/findings --overwrite
	@echo ""
	@echo "Demo done. MLflow store: $(CURDIR)/mlruns.db  (mlflow ui --backend-store-uri sqlite:///mlruns.db)"
	@echo "           checkpoint:   $(CURDIR)/demo/checkpoints/best.ckpt"
	@echo "           findings:     $(CURDIR)/demo/findings  (per study: findings.json, DICOM SR, GSPS, overlay PNGs)"

# 3D: synthetic MR phantoms (DICOM series and NIfTI) -> check -> train on patches -> per-scan
# evaluation -> findings per scan (docs/usage.md, "Volumes (3D)").
demo-volumes: setup
	$(BIN)/medrpn synth --out demo/volumes --volumes 40 --seed 0
	$(BIN)/medrpn synth --out demo/new_volumes --volumes 4 --seed 1000
	$(BIN)/medrpn check-data --config configs/synth_volumes.yaml
	$(BIN)/medrpn fit --config configs/synth_volumes.yaml
	$(BIN)/medrpn evaluate --ckpt demo/volume_checkpoints/best.ckpt
	$(BIN)/medrpn predict --ckpt demo/volume_checkpoints/best.ckpt --input demo/new_volumes/volumes --output demo/volume_findings --overwrite

# The tests run in parallel processes (pytest-xdist), one per logical CPU up to TEST_PROCESSES_MAX,
# each taking whole test files, so a module's fixtures (a trained checkpoint, a synthetic dataset)
# are made once. Much of the suite waits on subprocesses, servers and files rather than computing:
# CI's run with one process had grown to 34 minutes (docs/performance.md has the figures).
# `make test TEST_PROCESSES=0` runs it in one process.
TEST_PROCESSES ?= logical
TEST_PROCESSES_MAX ?= 4
PYTEST_PARALLEL = -n $(TEST_PROCESSES) --maxprocesses $(TEST_PROCESSES_MAX) --dist loadfile

test: setup conformance-tools
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

# The same tests on the lowest versions pyproject.toml allows (.ci/lowest.txt), in a venv of their
# own: the floors are tested, not guessed. LOWEST_TESTS picks the tests (default: all).
LOWEST_VENV ?= .venv-lowest
LOWEST_TESTS ?=
test-lowest: setup $(LOWEST_VENV)/.installed conformance-tools
	NO_ALBUMENTATIONS_UPDATE=1 $(LOWEST_VENV)/bin/python -m pytest -q $(PYTEST_PARALLEL) $(LOWEST_TESTS)

# The floors venv starts as a hard-linked copy of the dev venv's packages (no second copy of
# torch's 5.5 GB of CUDA libraries on disk: CI ran out of space installing it), then pip moves every
# pinned package to its floor. pip never writes into an installed file (it removes and adds), so
# the dev venv is untouched; torch and torchvision are unpinned and stay shared.
$(LOWEST_VENV)/.installed: $(VENV)/.installed pyproject.toml .ci/lowest.txt
	rm -rf $(LOWEST_VENV)
	$(PYTHON) -m venv --without-pip $(LOWEST_VENV)
	cp -al "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/." \
	  "$$($(LOWEST_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	$(LOWEST_VENV)/bin/python -m pip install --quiet -e ".[dev]" -c .ci/lowest.txt
	touch $@

# dciodvfy (Debian's dicom3tools) checks the DICOM SR/GSPS that predict writes; Orthanc (Debian's
# orthanc) is the real PACS that medrpn serve's round-trip tests start on loopback ports (its
# service is not started; the tests run their own); Debian's chromium, headless, runs the review
# page's browser test. Installed where apt-get can (as root);
# elsewhere those tests skip and the test summary says so.
conformance-tools:
	@command -v dciodvfy >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && apt-get update -qq && apt-get install -y -qq dicom3tools >/dev/null; } \
	  || echo "dicom3tools could not be installed: the DICOM conformance checks (dciodvfy) will be skipped"
	@command -v Orthanc >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && { apt-get install -y -qq orthanc >/dev/null 2>&1 \
	            || { apt-get update -qq && apt-get install -y -qq orthanc >/dev/null 2>&1; }; }; } \
	  || echo "orthanc could not be installed: the PACS round-trip tests of medrpn serve will be skipped"
	@command -v chromium >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
	            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; }; } \
	  || echo "chromium could not be installed: the browser test of medrpn review will be skipped"

clean-demo:
	rm -rf demo
