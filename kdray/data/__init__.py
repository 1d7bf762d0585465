"""Image sets in: sources (a registry), the image-folder cache, train/val/test splits, replayable
views, the batch loader."""
