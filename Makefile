# The two commands the README promises. Each runs the (idempotent) setup first.
SHELL := /bin/bash
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	source .comfyui/env.sh && "$$COMFYUI_PYTHON" scripts/demo.py $(DEMO_ARGS)

test: setup
	source .comfyui/env.sh && "$$COMFYUI_PYTHON" -m pytest tests $(PYTEST_ARGS)
