"""Datasets, augmentation and JPEG packing."""
