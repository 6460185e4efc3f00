"""vlbench: a reproducible workbench for image-text alignment and image captioning."""

__version__ = "0.1.0"
