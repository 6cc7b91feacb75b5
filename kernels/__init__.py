"""Sequence-mixing operations: Triton kernels, their autograd Functions and plain-PyTorch references.

One module per operation. Each keeps its PyTorch reference beside the kernels: the reference
is the oracle in tests and the path used where Triton cannot run (a CPU without
``TRITON_INTERPRET=1``).
"""
