"""twolevel_kfac.experiments."""
