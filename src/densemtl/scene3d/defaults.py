"""Defaults of the 3-D outputs that the command line shows before numpy loads (stdlib only, no imports).

Why a module of its own: ``densemtl --help`` builds every parser, and importing ``scene3d.scene`` for one
number would load numpy and torch.
"""

# Relative depth std (depth_std / depth) above which a point is dropped from the cloud and the BEV, for models
# with depth uncertainty; 0 keeps every point. Chosen on the synthetic validation data by
# benchmarks/uncertainty.py: the demo model's 90th percentile of the calibrated relative std on the first half
# of val (0.400). On the second half it keeps 90.3 % of the pixels, whose AbsRel is 0.201 against 0.221 for all
# and 0.415 for the dropped ones.
DEFAULT_MAX_REL_STD = 0.4
