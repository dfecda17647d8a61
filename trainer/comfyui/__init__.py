"""The engine's only gateway to ComfyUI's objects (MODEL, CLIP, VAE, samplers, progress, folders).

Everything else in ``trainer/`` is plain Python/torch and is tested without ComfyUI. ComfyUI is
imported lazily inside the functions, so importing this package never requires ComfyUI either.

* ``models``: what kind of SDXL a MODEL is, its parts, the raw U-Net call.
* ``training``: the MODEL/CLIP a run trains through in every memory mode, loading, dtypes.
* ``kernels``: gradient checkpointing and the kernels that have a backward, for the training block.
* ``encoders``: VAE/CLIP encoding as ComfyUI's nodes do it, and what the caches fingerprint.
* ``sampling``: ComfyUI's sampler and LoRA loader (previews, the train node's outputs).
* ``services``: progress, cancel, websocket events, folders and files.

How training runs on the MODEL that ComfyUI already loaded, without a second copy of the U-Net:

* Loader nodes run under ``torch.inference_mode()``, so the frozen weights are inference tensors,
  which autograd may not save for backward. ``training.training_models`` clones the MODEL (and the CLIP
  when the text encoders train) and, for the run, puts an alias over each inference weight's memory that
  autograd may save (no copy; inference tensors again on exit). ComfyUI may stream weights that do not fit on
  the GPU through cast buffers it reuses layer after layer: a forward pre-hook gives exactly those layers a
  weight wrapper, so ComfyUI's ``cast_bias_weight`` hands them a private copy (one layer at a time, freed with
  gradient checkpointing), while resident weights are used in place. The frozen U-Net stays in the dtype
  ComfyUI loaded it in. Under DynamicVRAM the clone is made from ComfyUI's non-dynamic delegate (see
  ``training._non_dynamic``).
* ComfyUI decides what is loaded where (``training.load_for_training``), in every memory mode.
* LoRA branches are forward hooks on the shared modules (trainer/network/), registered only
  inside the training context; attention kernels and layers without a backward are swapped for the
  block (``kernels.differentiable_attention``, ``kernels.differentiable_layers``). On exit every hook, weight
  wrapper, weight alias, forward override and ``requires_grad`` flag is restored, so every other node sees the
  MODEL exactly as it came in.
"""
