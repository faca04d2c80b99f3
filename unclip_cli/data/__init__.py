"""Training data: the procedural shapes dataset, image/caption sources, and CLIP embedding caches."""
