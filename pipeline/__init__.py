"""modelhash: find copies of neural-network models by perceptual hashes of their weights."""

__version__ = "0.1.0"
