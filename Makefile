# Two commands do everything on a fresh machine:
#   make book   build the HTML book, executing every chapter with CPU defaults (the quick profile)
#   make test   run the unit tests and validate every chapter with nbval
# Each creates .venv if it is missing and installs requirements.txt under constraints.txt (the
# versions everything was tested with), then annsnn in editable mode.
# `make lock` refreshes constraints.txt from a fresh resolve of requirements.txt.

VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The second instruction-set pass of CI: the chapters and tests that state exact numerical claims,
# rerun with the plainest kernels of MKL, ATen and oneDNN, as an older CPU would run them. (Chapters 3
# to 9 run under these kernels in CI's `make check-claims` step, with a network trained under them.)
OLD_CPU := MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41
EXACT   := tests/test_theory.py tests/test_theory_extra.py tests/test_convert_simulate.py tests/test_rnl.py \
           tests/test_baselines.py \
           tests/test_qcfs.py book/01_spiking_neurons.ipynb book/02_firing_rate.ipynb

.PHONY: book test test-old-cpu check-html check-claims install lock clean release-check student-edition

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -c constraints.txt -r requirements.txt
	$(PYTHON) -m pip install --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

book: $(STAMP)
	$(PYTHON) tools/build_book.py
	@echo "open _build/html/index.html"

# pytest-xdist runs the tests on every core (at most 4 workers), each notebook's cells in one worker, in
# order (--dist loadscope); TEST_JOBS=0 runs them all in this one process.
TEST_JOBS ?= auto
test: $(STAMP)
	$(PYTHON) -m pytest tests book --nbval-lax -q -n $(TEST_JOBS) --maxprocesses 4 --dist loadscope; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: check the test paths in the Makefile" >&2; fi; \
	exit $$rc

# The built book in a headless Chromium with the network refused (tests/test_html_book.py); run after
# `make book`. Installs Debian's chromium if it is missing. Screenshots go to _build/screenshots.
check-html: $(STAMP)
	bash tools/install_chromium.sh
	ANNSNN_HTML_TESTS=1 $(PYTHON) -m pytest tests/test_html_book.py -q

test-old-cpu: $(STAMP)
	$(OLD_CPU) $(PYTHON) -m pytest $(EXACT) --nbval-lax -q

# Every assertion of the training chapters (3-9) over ten networks: seeds 0-4, each with the default and
# the old-CPU kernels (tools/check_claims.py); two settings at a time (a single setting: two of its
# chapters at a time), one CPU thread each. Run it before changing what a chapter claims.
# `make check-claims CLAIMS="--seeds 3 --kernels old"` runs one setting (CI); `CLAIMS="--write"` also
# stores the summary in annsnn/stored/claims.json.
CLAIMS ?=
check-claims: $(STAMP)
	$(PYTHON) tools/check_claims.py $(CLAIMS)

lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -r requirements.txt
	{ sed -n '1,3p' constraints.txt; .venv-lock/bin/python -m pip freeze --all --exclude-editable \
	  | grep -v -E '^(pip|annsnn)=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .venv-lock
	@echo "constraints.txt refreshed: run 'make book' and 'make test', then commit it"

# The chapters without their answers (_build/student/book) and the answers alone (_build/student/solutions).
student-edition: $(STAMP)
	$(PYTHON) tools/student_edition.py _build/student

# Before publishing: fails while _config.yml still names the placeholder repository (not part of CI).
release-check:
	python3 tools/set_repository.py --check

clean:
	rm -rf _build book/runs runs
