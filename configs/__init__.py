"""Recipes: ml_collections config files, one per data set; base.py holds every key."""
