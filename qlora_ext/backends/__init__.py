"""Implementations of the qlora_ext ops per device, registered against the schemas in ``qlora_ext/ops.py``
(the pattern of bitsandbytes' ``backends/``): ``cuda`` holds the CUDA implementations and the registry of
kernel paths that ``qlora_ext/policy.py`` chooses from; the default (CPU and every unsupported case) is the
pure-PyTorch twin in ``qlora_ext/reference.py``."""
