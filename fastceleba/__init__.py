"""fastceleba: fast CelebA loading (WebDataset shards, DALI) and the seed notebook's AE/VAE."""

__version__ = "0.1.0"
