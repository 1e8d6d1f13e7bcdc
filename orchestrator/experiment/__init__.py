"""What a YAML file becomes: configs validated, expanded into run specs, planned against what is already on disk."""
