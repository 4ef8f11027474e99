"""Data: ARAD-1K / MST++ layout readers, synthetic scenes, the grain input pipeline."""
