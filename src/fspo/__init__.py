"""fspo: Few-Shot Preference Optimization, personalizing LLMs to each user from a few preferences."""

__version__ = "0.1.0"
