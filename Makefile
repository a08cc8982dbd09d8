# The two commands of the README: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean browser

$(BIN)/python:
	$(PY) -m venv $(VENV)

# pip resolves torch/torchvision to the wheels already on this machine; no index is pinned.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/layerwise fit --strategy full --label-smoothing 0.1 --out runs/demo --overwrite

# The compare report's browser test needs Debian's chromium; without root it is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the HTML report browser test will be skipped"

test: $(STAMP) browser
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src/layerwise
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/strategies.py

clean:
	rm -rf $(VENV) runs build *.egg-info
