# qvaudio: the two commands a person needs are `make demo` and `make test`.
# Both install what they need (Debian/Ubuntu packages, then a virtualenv).
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test check deps venv lint typecheck unit unit-fast bench clean

# Tests that need nothing but Python: no audio daemon, xenstored, D-Bus, QEMU
# or rpmbuild (tests/conftest.py marks the others by the fixtures they use).
FAST := not needs_audio and not needs_xenstore and not needs_dbus and not needs_qemu and not needs_rpm

deps:
	./scripts/install-deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,dom0]'
	touch $(STAMP)

venv: deps $(STAMP)

lint: venv
	$(VENV)/bin/ruff check qvaudio tests bench
	$(VENV)/bin/ruff format --check qvaudio tests bench

typecheck: venv
	$(VENV)/bin/mypy qvaudio tests bench

unit: venv
	$(VENV)/bin/pytest --durations=25

unit-fast: venv
	$(VENV)/bin/pytest -q -m '$(FAST)'

# Everything a test run checks (lint, types, tests) in minutes; CI's command.
test: lint typecheck unit

# The quick loop while changing code: lint, types and the tests that need no
# daemon, in under a minute. `make test` before you push.
check: lint typecheck unit-fast

demo: venv
	$(VENV)/bin/qvaudio demo

bench: venv
	$(VPY) -m bench.transport_bench
	$(VPY) -m bench.protocol_bench
	$(VPY) -m bench.latency_bench
	$(VPY) -m bench.gaps_bench
	$(VPY) -m bench.scale_bench
	$(VPY) -m bench.revocation_bench
	$(VPY) -m bench.hostile_bench
	$(VPY) -m bench.recovery_bench

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache

# RPM packages from rpm/qvaudio.spec: python3-qvaudio, qvaudio-common,
# qvaudio-dom0, qvaudio-guest and the SRPM, built from the working tree.
.PHONY: rpm rpm-test
rpm: venv
	./scripts/build-rpm.sh dist/rpm

# Only the packaging tests (make test runs them too).
rpm-test: venv
	$(VENV)/bin/pytest tests/test_rpm.py tests/test_manpages.py

# qvaudio on real Xen: Xen 4.17 under QEMU (software emulation), qvaudio-dom0
# in a PV dom0 and qvaudio-guest in a PV domU over the real libxenvchan; one
# JSON result under results/xen/<timestamp>/ (docs/xen.md). make test runs it
# too, through tests/test_xen.py.
.PHONY: xen-test
xen-test: venv
	./tests/xen/run-xen-test.sh
