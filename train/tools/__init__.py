"""The tools around training: benchmarks and the demo.

- ``bench``: ``ssl-cli bench train``, the trainer's images/s against its compute ceiling;
- ``quality``: ``ssl-cli bench quality``, every method at an equal compute budget over seeds;
- ``demo``: the training half of ``make demo``.
"""
