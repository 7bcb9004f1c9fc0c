"""Data: decoding, preprocessing, sources, augmentation and the loader."""
