"""Export to the engines users serve with, and import back (see formats.py for the tensors)."""
from .formats import EXPORT_FORMATS, ExportError
from .importer import detect, load_exported
from .writer import export_checkpoint

__all__ = ["EXPORT_FORMATS", "ExportError", "detect", "load_exported", "export_checkpoint"]
