"""twolevel_kfac.curvature."""
