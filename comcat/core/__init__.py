"""What both sides share, importing nothing else of comcat: errors, files that are never
half-written, image files and the procedural shapes world, the embedded models' assets, the
low-rank linear algebra, and the training-loop plumbing (devices, torchrun, stop signals)."""
