# Two commands on a fresh machine:  make quickstart  |  make test
# Both create .venv with Python 3.12 (found on PATH or in pyenv) and install the package into it: the
# quickstart only what it runs (the package's own dependencies), the tests the extras they exercise too.

VENV   ?= .venv
PY     := $(VENV)/bin/python
# transformers, lm-eval, the server, wandb (test), DALI's CPU pipelines and zstd inputs (optional for users)
TEST_EXTRAS ?= test,dali,zstd

# The first interpreter that really is 3.12: python3.12 on PATH, then pyenv's versions.
define find_python312
for c in "$$(command -v python3.12)" $$(ls -d "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do \
  [ -n "$$c" ] && "$$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { echo "$$c"; exit 0; }; \
done; exit 1
endef

.PHONY: quickstart test env clean

$(VENV)/.installed-base: pyproject.toml
	@py=$$( $(find_python312) ) || { echo "tidar_megatron needs Python 3.12 (megatron-core >= 0.17 requires it): install it, e.g. 'pyenv install 3.12', and rerun"; exit 1; }; \
	echo "creating $(VENV) with $$py"; \
	[ -x $(PY) ] || "$$py" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(PY) -m pip install -q -e '.[$(TEST_EXTRAS)]'
	@touch $@

env: $(VENV)/.installed-base

quickstart: $(VENV)/.installed-base
	$(VENV)/bin/tidar-megatron quickstart

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -rs --durations=15

clean:
	rm -rf $(VENV) runs build *.egg-info
