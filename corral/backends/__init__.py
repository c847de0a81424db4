"""Instance providers: they create and terminate instances, nothing else."""
