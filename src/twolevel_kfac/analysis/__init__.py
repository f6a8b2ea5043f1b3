"""twolevel_kfac.analysis."""
