"""The benchmarks behind ``sae-batchtopk bench`` and ``bench-speed``.

``quality`` compares architectures on the same cached activations (L0, NMSE, CE/KL, dead
latents); ``speed`` times training steps. Both train through SAELens's ``SAETrainer`` on
activations from :mod:`.activation_cache`.
"""
