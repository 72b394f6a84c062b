"""Predictions in 3-D: back-projection to semantic point clouds (OpenCV camera frame, metres) and the BEV map."""
