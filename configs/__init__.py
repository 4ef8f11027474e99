"""Training configurations (`ml_collections`): the base config and one module per recipe."""
