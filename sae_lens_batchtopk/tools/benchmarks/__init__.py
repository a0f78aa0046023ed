"""The benchmarks behind ``sae-batchtopk bench`` and ``sae-batchtopk bench-speed``.

- ``quality``: ``bench``, SAELens's built-ins against ours on the same tokens (L0, NMSE,
  CE/KL, dead latents), resumable run by run; ``quality_config`` holds its settings and
  presets, ``quality_report`` its tables, verdicts, plot and section.
- ``speed``: ``bench-speed``, training-step throughput of the sparse and dense paths (plain
  or Matryoshka BatchTopK); ``speed_report`` its table, loss curves and section.
- ``foreign``: ``bench-import``, a foreign SAE's inference L0 and NMSE as imported and after
  calibration (``train_dictionary_learning.py``, run as a file, trains one in dictionary_learning).
- ``harness``: what both share (model and activation cache, SAE and trainer setup, the
  peak-memory probe, CE/KL scoring, machine info, output files); ``command_line``: their
  parsers, generated from the config dataclasses; ``activation_cache``: the cached
  activations every run trains on.
"""
