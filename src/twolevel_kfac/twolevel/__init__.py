"""twolevel_kfac.twolevel."""
