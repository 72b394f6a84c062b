"""Model zoo: backbones, decoders, heads and the multi-task network; ``build_model(cfg)`` builds one."""

from densemtl.models.backbones import BACKBONES, Backbone
from densemtl.models.decoders import DECODERS
from densemtl.models.multitask import MultiTaskNet, build_model

__all__ = ["BACKBONES", "DECODERS", "Backbone", "MultiTaskNet", "build_model"]
