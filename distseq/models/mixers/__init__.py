"""Sequence mixers beyond full attention, one file each, each a model of its own stacked in the shared
pre-norm block structure (``models/stack.py``): ``sliding-window`` (softmax attention over a window),
``based`` (Taylor linear attention plus a small window), ``hyena`` (gated long convolutions with an
implicit filter, by FFT) and ``mamba`` (Mamba-2's selective state space, SSD in chunked form). Plain
PyTorch: they run wherever torch does.
"""
