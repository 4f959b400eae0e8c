# Two commands do everything on a fresh Debian/Ubuntu machine (as root):
#   make demo   - set up, then run the main job on the built-in two-node local cluster
#   make test   - set up, then run the whole test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
APT_PACKAGES := openssh-server openssh-client rsync pdsh pypy3 iproute2 python3-venv tmux

.PHONY: setup system venv demo test test-fast lint bench clean

setup: system venv

# System packages the tests need: sshd for the network-namespace nodes, rsync for transfers,
# pdsh for benchmark baselines, pypy3 as a second Python minor for drift tests, tmux for the tests that
# press Ctrl-C in a real terminal.
system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# The main job: provision the two local nodes, build the tiny model with a node's own stack
# (the controller needs no torch), then train it across both nodes and follow it.
demo: setup
	$(VENV)/bin/llamafleet provision -i inventory/local
	test -f examples/tiny/model/config.json || inventory/local/.llamafleet/nodes/local1/stacks/current/bin/python \
	  python/llamafleet/tinymodel.py examples/tiny/model --data examples/tiny/data/tiny_alpaca.jsonl
	$(VENV)/bin/llamafleet train -i inventory/local examples/tiny/sft_lora.yaml --follow

test: setup
	$(VENV)/bin/python -m pytest tests

test-fast: setup
	$(VENV)/bin/python -m pytest tests -m "not slow"

lint: setup
	$(VENV)/bin/ansible-lint

bench: setup
	$(VENV)/bin/python bench/provision_noop.py

clean:
	rm -rf .llamafleet inventory/local/.llamafleet build dist
