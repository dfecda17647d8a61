"""Thin ComfyUI V3 nodes: a schema each, and a call into the engine (trainer/)."""
