"""The FID engine: torch-fidelity's Inception features, cached reference statistics, scores of a model."""
