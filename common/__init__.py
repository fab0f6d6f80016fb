"""What two or more projects use: device choice, timing, memory, provenance. Nothing else."""
