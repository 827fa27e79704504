# make demo  : create .venv, install, run the whole pipeline at tiny size on CPU (embedded data set)
# make test  : create .venv if needed, install, run the test suite
# make headstart : does pre-training help? RCM-T vs scratch, judged on samples during fine-tuning (tools/headstart.sh)
# make gpu-check : on a GPU machine, prove the GPU path in one short run at paper sizes (tools/gpu_check.py; tiny on CPU)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-requirements

.PHONY: test demo headstart gpu-check venv clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	cp requirements.txt $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

demo: $(STAMP)
	$(PY) demo.py

headstart: $(STAMP)
	PYTHON=$(PY) bash tools/headstart.sh

gpu-check: $(STAMP)
	$(PY) tools/gpu_check.py

clean-venv:
	rm -rf $(VENV)
