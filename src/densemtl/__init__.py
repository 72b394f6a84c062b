"""densemtl: one network for semantic segmentation and metric depth."""

__version__ = "0.1.0"
__all__ = ["save_pretrained"]


def __getattr__(name: str):
    """``densemtl.save_pretrained``, imported on first use so that ``import densemtl`` stays light (fast --help)."""
    if name == "save_pretrained":
        from densemtl.deploy.pretrained import save_pretrained

        return save_pretrained
    raise AttributeError(f"module 'densemtl' has no attribute {name!r}")
