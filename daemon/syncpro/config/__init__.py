"""Configuration: the settings model, its YAML loading and cross-checks, and the import of the
original platform's config. It owns every key, its default and its meaning; it imports the
inventory's data model for apps written into the config, and nothing of the engine or the daemon.
"""
