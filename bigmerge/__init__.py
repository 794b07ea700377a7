"""bigmerge: merge 70B-100B language-model checkpoints across the ranks of a cluster."""

__version__ = "0.1.0"
