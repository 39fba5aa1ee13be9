# Two entry points a new user needs (see README): `make demo` and `make test`.
# Both create ./.venv on first use; torch's CPU build is installed first, pinned,
# because an unpinned `torch` resolves to a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install demo test smoke clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) jobs/full.py --config jobs/configs/demo.yaml $(ARGS)

smoke: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) jobs/full.py --config jobs/configs/tiny.yaml --smoke-test

# pytest exits 5 when no test was collected; any non-zero exit fails `make test`.
test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
