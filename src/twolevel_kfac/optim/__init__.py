"""twolevel_kfac.optim."""
