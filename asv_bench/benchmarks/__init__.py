"""asv benchmarks of cynorm; the shape table comes from ``cynorm.benchmarks.SHAPE_TABLE``."""
