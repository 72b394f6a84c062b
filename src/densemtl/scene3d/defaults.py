"""Defaults of the 3-D outputs that the command line shows before numpy loads (stdlib only, no imports).

Why a module of its own: ``densemtl --help`` builds every parser, and importing ``scene3d.scene`` for one
number would load numpy and torch.
"""

# Relative depth std (depth_std / depth) above which a point is dropped from the cloud and the BEV, for models
# with depth uncertainty; 0 keeps every point. Provisional: the lead will replace the value with one chosen
# on the synthetic validation data.
DEFAULT_MAX_REL_STD = 0.15
