"""Speed: `bench`, its per-device cache, and the workload model that projects a study's time."""
