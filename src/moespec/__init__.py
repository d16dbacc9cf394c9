"""moespec: a SLURM-oriented batch pipeline for embedding-space stratification and MoE specialisation.

Importing the package is cheap: torch, transformers and scikit-learn are imported by the
stage modules that need them, inside functions.
"""

__version__ = "0.1.0"
