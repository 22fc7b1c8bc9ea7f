# A fresh machine needs exactly `make run` and `make test`: both install first when needed.
# What gets installed is requirements.lock, exactly (versions and hashes, every runtime and dev package),
# by uv, itself pinned with its hashes in tools.lock;
# pyproject.toml keeps the ranges a library user gets. `make lock` updates the lock after pyproject
# changes (keeping every pin that still fits), `make lock-upgrade` moves every pin to the newest release,
# and `make lock-check` (part of `make lint`, so of CI) fails when the two disagree.
PYTHON     ?= python3
VENV       := .venv
BIN        := $(VENV)/bin
TOOLS      := .tools
UV         := $(TOOLS)/bin/uv
STAMP      := $(VENV)/.installed-stamp
FEEDS      ?= feeds.yaml
LOCK_ARGS  := pyproject.toml --extra dev --universal --generate-hashes --python-version 3.11 \
              --custom-compile-command "make lock" --quiet
TOOLS_ARGS := --universal --generate-hashes --python-version 3.11 --custom-compile-command "make tools-lock" --quiet
export UV_PYTHON_DOWNLOADS := never

.PHONY: install lock lock-upgrade lock-check tools-lock run test validate lint bench clean

$(UV): tools.lock
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check --require-hashes -r tools.lock

# Bytecode compiled at install, as a production image has it: with no .pyc (PYTHONDONTWRITEBYTECODE, a
# read-only venv) every start compiles ccxt from source: seconds of CPU and heap that is never returned.
$(STAMP): pyproject.toml requirements.lock | $(UV)
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip sync --quiet --compile-bytecode --python $(BIN)/python --require-hashes requirements.lock
	$(UV) pip install --quiet --python $(BIN)/python --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

lock: | $(UV)
	$(UV) pip compile $(LOCK_ARGS) -o requirements.lock

lock-upgrade: | $(UV)
	$(UV) pip compile $(LOCK_ARGS) --upgrade -o requirements.lock
	echo uv | $(UV) pip compile - $(TOOLS_ARGS) --upgrade -o tools.lock

tools-lock: | $(UV)
	grep -oE '^uv==[^ ]+' tools.lock | $(UV) pip compile - $(TOOLS_ARGS) -o tools.lock

# Pins only (name==version and markers): a wheel added to a pinned release changes hashes, not agreement.
lock-check: | $(UV)
	@tmp=$$(mktemp -d); cp requirements.lock $$tmp/; \
	$(UV) pip compile $(LOCK_ARGS) -o $$tmp/requirements.lock && \
	grep -E '^[A-Za-z0-9]' requirements.lock > $$tmp/want && grep -E '^[A-Za-z0-9]' $$tmp/requirements.lock > $$tmp/got && \
	diff -u $$tmp/want $$tmp/got > $$tmp/diff && echo "requirements.lock agrees with pyproject.toml" || \
	{ cat $$tmp/diff; echo "requirements.lock disagrees with pyproject.toml: run make lock"; rm -rf $$tmp; exit 1; }; \
	rm -rf $$tmp

run: install
	$(BIN)/feedrunner run $(FEEDS)

test: install
	$(BIN)/pytest -q -n 2 --dist loadfile

validate: install
	$(BIN)/feedrunner validate $(FEEDS)

lint: install lock-check
	$(BIN)/ruff check feedrunner tests bench
	$(BIN)/ruff format --check feedrunner tests bench

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache
