# The two set-up commands: `make test` and `make demo`. Both provision a real ComfyUI first
# (cached under ~/.cache, keyed on the pins; COMFYUI_DIR=/path/to/ComfyUI uses your own).
# COMFYUI=0.33.0 runs on ../shared's ComfyUI 0.33.0 instead of 0.3.75; without ../shared it says so and skips.
SHELL := /bin/bash
PYTEST_ARGS ?=
SUITE ?= all
QUICK ?=
COMFYUI ?=
# benchmarks on real weights (suites named *_real) need 0.33.0; everything else defaults to 0.3.75
BENCH_COMFYUI = $(or $(COMFYUI),$(if $(filter %_real,$(firstword $(subst ., ,$(SUITE)))),0.33.0,0.3.75))
provision_for = eval "$$(COMFYUI_VERSION=$(1) bash tools/provision.sh)"; \
	if [ -n "$${COMFYUI_SKIPPED:-}" ]; then echo "$$COMFYUI_SKIPPED"; exit 0; fi
PROVISION = $(call provision_for,$(or $(COMFYUI),0.3.75))

.PHONY: test test-matrix demo bench provision dataset models gpu-bundle gpu-check

provision:
	@$(PROVISION); echo "ComfyUI: $$COMFYUI_DIR"; echo "Python:  $$COMFY_PYTHON"

test:
	@set -e; $(PROVISION); "$$COMFY_PYTHON" -m pytest $(PYTEST_ARGS)

# The fast part of the suite under each of torch's vector-kernel paths and 1 and 2 threads (tools/test_matrix.sh).
test-matrix:
	@set -e; $(PROVISION); bash tools/test_matrix.sh

demo:
	@set -e; $(PROVISION); "$$COMFY_PYTHON" tools/demo.py

# SUITE: a suite (all its parts), <suite>.<part>, a part's result name, or all (bench/run.py).
bench:
	@set -e; $(call provision_for,$(BENCH_COMFYUI)); QUICK=$(QUICK) "$$COMFY_PYTHON" -m bench $(SUITE)

# The captioned emoji image set for training the tiny models, extracted into the cache (tools/emoji_dataset.py).
dataset:
	@set -e; $(PROVISION); "$$COMFY_PYTHON" tools/emoji_dataset.py

# Retrain the tiny models in models/ from the emoji set on this CPU (about 90 minutes; flux2 needs ComfyUI 0.33 and taef2; models/README.md).
models: dataset
	@set -e; $(PROVISION); for stage in vae vae16 embed eps flow flux2 plot; do "$$COMFY_PYTHON" tools/train_models.py $$stage; done

# On a machine with internet: ComfyUI's tree and the wheels a GPU machine lacks, into .gpu_bundle/.
gpu-bundle:
	@bash tools/gpu_bundle.sh

# On the GPU machine (Python 3.12 + CUDA torch, no internet), with .gpu_bundle/ carried there.
gpu-check:
	@python3 tools/gpu_check.py
