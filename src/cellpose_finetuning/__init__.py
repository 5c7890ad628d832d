"""Fine-tune Cellpose-SAM on a handful of annotated images and serve the result."""

__version__ = "0.1.0"
