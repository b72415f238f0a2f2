# vlp: `make demo` and `make test` are all a user needs on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlp-installed
PIP := $(BIN)/python -m pip -q --disable-pip-version-check
TORCH ?= torch==2.13.0

.PHONY: setup chromium demo test test-fast bench bench-train lock clean

setup: $(STAMP)

# torch first (a CPU wheel here; set TORCH=... for a CUDA build), then DeepSpeed without build
# isolation (its build otherwise downloads another torch), then vlp itself, all pinned by constraints.txt.
# Last, DeepSpeed's CPU communication op and its CPU Adam (optimizer offload) are built once here (~2 min each,
# cached in torch's extensions folder), not JIT-built by the first training on the machine that needs them (on CUDA
# builds there is no CPU communication op and that line does nothing).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -c constraints.txt "$(TORCH)"
	$(PIP) install -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install -c constraints.txt -e ".[test]"
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	$(BIN)/python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
	$(MAKE) --no-print-directory chromium
	touch $(STAMP)

# Headless Chromium for the chat page's browser test (tests/serve/test_serve_app.py; it skips without it), from
# Debian's packages when apt-get is there (as root, or through sudo); elsewhere install chromium + chromedriver.
chromium:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      chromium-driver; } || echo "warning: chromium not installed; the chat page's browser test will skip"; \
	  else echo "no apt-get: install chromium and chromedriver for the chat page's browser test"; fi; }

demo: $(STAMP)
	$(BIN)/vlp demo

# A run killed while DeepSpeed JIT-builds its CPU op leaves torch's build lock behind, and every later DeepSpeed
# init waits on it forever (torch's FileBaton has no staleness check). A build takes ~2 min: a lock older than 15 is stale.
test: $(STAMP)
	-find "$${TORCH_EXTENSIONS_DIR:-$$HOME/.cache/torch_extensions}" -name lock -mmin +15 -print -delete 2>/dev/null
	$(BIN)/python -m pytest tests -q -n 2 --dist loadfile --no-loadscope-reorder --durations=40

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/bench_decode.py
	$(BIN)/python bench/bench_precompute.py
	$(BIN)/python bench/bench_pack.py
	$(BIN)/python bench/bench_audio.py

bench-train: $(STAMP)
	$(BIN)/python bench/train_padding.py
	$(BIN)/python bench/train_online.py
	$(BIN)/python bench/train_zero_memory.py
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/train_tower.py
	$(BIN)/python bench/train_activation_memory.py

lock: $(STAMP)
	( echo "# Exact versions the test suite ran with (make test installs with -c constraints.txt)."; \
	  echo "# Regenerate with: make lock"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^vlp' | sed 's/^torch==\(.*\)+cpu/torch==\1/' ) > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf runs .pytest_cache
