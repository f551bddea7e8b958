"""GPU kernels (Triton). No model or HF code here; importing this package does not
initialise CUDA. Each kernel has a pure-torch oracle in arcquant.formats / arcquant.arc."""
