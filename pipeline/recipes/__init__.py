"""Recipe YAML files; load them with `pipeline.config.load_recipe`."""
