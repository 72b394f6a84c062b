"""densemtl: one network for semantic segmentation and metric depth."""

__version__ = "0.1.0"
