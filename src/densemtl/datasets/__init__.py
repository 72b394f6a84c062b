"""Converters from public datasets (NYUv2, Cityscapes, KITTI) to the densemtl folder format."""
