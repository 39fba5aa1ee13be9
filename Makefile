# Two entry points a new user needs (see README): `make demo` and `make test`.
# Both create ./.venv on first use; torch's CPU build is installed first, pinned,
# because an unpinned `torch` resolves to a multi-GB CUDA build.
# Silent on success apart from the project's own output: commands are not echoed and pip
# prints only errors (set V=1 to see both).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PIP := $(PY) -m pip install -qq --disable-pip-version-check --root-user-action=ignore

ifneq ($(V),1)
.SILENT:
endif

.PHONY: install demo test smoke clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m chimera_ray.cli run jobs/configs/demo.yaml $(ARGS)

smoke: $(STAMP)
	$(PY) tests/tiny.py >/dev/null  # the tiny random model (test material) it loads
	RAY_AUTH_MODE=disabled $(PY) -m chimera_ray.cli run tests/configs/tiny.yaml --smoke-test $(ARGS)

# pytest exits 5 when no test was collected; any non-zero exit fails `make test`.
test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .venv-* outputs runs .pytest_cache
