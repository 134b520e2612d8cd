"""What every layer shares and that imports nothing else from shrinkml: lazy registries."""
