# `make ci`: the KVM suite in parallel for a bare-metal CI runner. Results land in results/:
# ktap.txt (KTAP v1, kselftest-compatible, checked with the strict parser in tests/), junit.xml
# (with per-case properties), info.txt (what this machine offers and what skips). The exit status is
# pytest's: 0 only when every case passed, skipped or failed as a known kernel issue, and something
# ran (a run where every case skipped exits 4, kselftest's skip code: see harness/pytest_outcome.py).
RESULTS ?= results

.PHONY: ci

ci: setup
	@mkdir -p $(RESULTS)
	$(PY) -m harness info > $(RESULTS)/info.txt 2>&1 || true
	$(PYTEST) cases/ -n $(JOBS) -p no:cacheprovider --ktap=$(RESULTS)/ktap.txt \
		--junitxml=$(RESULTS)/junit.xml $(PYTEST_ARGS); rc=$$?; \
	$(PY) -m tests.ktap_parser $(RESULTS)/ktap.txt || rc=3; \
	exit $$rc
