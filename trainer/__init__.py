"""Training engine: plain Python, no ComfyUI imports."""
