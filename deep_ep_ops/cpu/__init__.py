"""Reference implementations over torch.distributed (gloo, CPU tensors).

They define the exact semantics the CUDA kernels must reproduce bit for bit; they favour
clarity over speed (every rank gathers what it needs with all_gather).
"""
