"""Tools built on the library: the ``sae-batchtopk`` command, reports, offline data, benchmarks.

Nothing here is loaded by ``import sae_lens_batchtopk``; the library never imports from here.
"""
