"""Handing a graph's training to kohya sd-scripts and back.

``run.py`` gathers what one kohya run needs from the graph (KohyaRun); ``config_export.py`` turns it into kohya's
``--config_file`` arguments and ``config_import.py`` reads such a file (or a LoRA's ss_* metadata) back into the
pack's settings; ``dataset_export.py`` writes the dataset as kohya's ``--dataset_config``; ``export_folder.py``
writes the whole folder (config.toml, dataset.toml, launch.sh, README.txt) atomically.
"""
