"""Denoising: the one loop (`loop`), a stage around it (`stages`), guidance, schedulers, regions and
feature caching."""
