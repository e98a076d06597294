# `make ci`: the KVM suite in parallel for a bare-metal CI runner. Results land in results/:
# ktap.txt (KTAP v1, kselftest-compatible, checked with the strict parser in tests/), junit.xml
# (with per-case properties), info.txt (what this machine offers and what skips). The exit status is
# pytest's: 0 only when every case passed, skipped or failed as a known kernel issue, and something
# ran (a run where every case skipped exits 4, kselftest's skip code: see harness/pytest/outcome.py).
RESULTS ?= results

.PHONY: ci

ci: setup
	@mkdir -p $(RESULTS)
	$(PY) -m harness info > $(RESULTS)/info.txt 2>&1 || true
	$(PYTEST) cases/ -n $(JOBS) -p no:cacheprovider --ktap=$(RESULTS)/ktap.txt \
		--junitxml=$(RESULTS)/junit.xml $(PYTEST_ARGS); rc=$$?; \
	$(PY) -m harness.report.ktap_parser $(RESULTS)/ktap.txt || rc=3; \
	exit $$rc

# `make check-repeat N=20`: the flakiness proof. Runs `make check` N times in a row, keeps each run's
# results in $(RESULTS)/repeat/<i>/, stops at the first red run and prints its summary line.
N ?= 20
.PHONY: check-repeat
check-repeat: setup
	@mkdir -p $(RESULTS)/repeat; \
	for i in $$(seq 1 $(N)); do \
		t0=$$(date +%s); \
		$(MAKE) --no-print-directory ci RESULTS=$(RESULTS)/repeat/$$i > $(RESULTS)/repeat/$$i.log 2>&1; rc=$$?; \
		echo "check-repeat: run $$i/$(N): exit $$rc in $$(( $$(date +%s) - t0 )) s: $$(grep -E '^=+ .*(passed|failed).* =+$$' $(RESULTS)/repeat/$$i.log | tail -1)"; \
		if [ $$rc -ne 0 ]; then grep -E '^(FAILED|ERROR) ' $(RESULTS)/repeat/$$i.log; exit $$rc; fi; \
	done; echo "check-repeat: $(N) runs in a row, all green"
