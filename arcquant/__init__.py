"""arcquant: NVFP4 W4A4 quantization of LLMs with ARCQuant augmented residual channels."""
__version__ = "0.1.0"
