"""The cluster definitions of rso_ray and their checker (clusters/check.py)."""
