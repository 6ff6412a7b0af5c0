# Two commands do everything on a fresh machine:
#   make book   build the HTML book, executing every chapter with CPU defaults (the quick profile)
#   make test   run the unit tests and validate every chapter with nbval
# Each creates .venv from requirements.txt if it is missing and installs annsnn in editable mode.

VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: book test install clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . -W --keep-going
	@echo "open _build/html/index.html"

test: $(STAMP)
	$(PYTHON) -m pytest tests book --nbval-lax -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: check the test paths in the Makefile" >&2; fi; \
	exit $$rc

clean:
	rm -rf _build book/runs runs
