"""Specialisation metrics of MoE models (pure numpy), run by the stages."""
