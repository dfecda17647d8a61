"""Things every node of the pack shares: the menu category and the custom socket types."""
from comfy_api.latest import io

CATEGORY = "training/sdxl_lora"

# Custom socket types: values that only our nodes produce and consume.
Dataset = io.Custom("SDXL_LORA_DATASET")
