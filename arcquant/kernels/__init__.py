"""GPU kernels (Triton). No model or HF code here; importing this package does not
initialise CUDA. Each kernel has a pure-torch oracle in arcquant.formats / arcquant.arc."""
import importlib.util
import os


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1): used by tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"
