# The two commands the README promises. Each runs the (idempotent) setup first.
SHELL := /bin/bash
.PHONY: setup setup-browser demo test lint format

setup:
	bash scripts/setup.sh

# Chromium + playwright-core for tests/browser. Exit 3 = Chromium cannot be installed on this machine: the
# browser test then skips with that reason; any other failure stops `make test`.
setup-browser:
	bash scripts/setup_browser.sh || [ $$? -eq 3 ]

demo: setup
	source .comfyui/env.sh && "$$COMFYUI_PYTHON" scripts/demo.py $(DEMO_ARGS)

test: setup setup-browser
	source .comfyui/env.sh && "$$COMFYUI_PYTHON" -m pytest tests $(PYTEST_ARGS)

# ruff (pinned in requirements-test.txt), configured in pyproject.toml; .ci/run runs this before the tests
lint: setup
	source .comfyui/env.sh && "$$COMFYUI_PYTHON" -m ruff check . && "$$COMFYUI_PYTHON" -m ruff format --check .

format: setup
	source .comfyui/env.sh && "$$COMFYUI_PYTHON" -m ruff check --fix . && "$$COMFYUI_PYTHON" -m ruff format .
