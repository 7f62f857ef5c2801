"""Data: sources (shapes, emoji, folders, HF datasets, webdatasets), one preprocessing path, the caches."""
