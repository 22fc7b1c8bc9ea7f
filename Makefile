# A fresh machine needs exactly `make run` and `make test`: both install first when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FEEDS  ?= feeds.yaml

.PHONY: install run test validate lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/feedrunner run $(FEEDS)

test: install
	$(BIN)/pytest -q

validate: install
	$(BIN)/feedrunner validate $(FEEDS)

lint: install
	$(BIN)/ruff check feedrunner tests bench
	$(BIN)/ruff format --check feedrunner tests bench

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
