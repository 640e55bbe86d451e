# Two entry points that work on a fresh machine with Python 3.10+ (see README):
#   make demo   set up, generate demo DICOM data, train, evaluate, predict on new scans
#   make test   set up and run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup clean-demo

setup: $(VENV)/.installed

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

test: setup
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf demo
