"""twolevel_kfac.experiments."""

from __future__ import annotations

from twolevel_kfac.extras import require_extra

require_extra("experiments", "twolevel_kfac.experiments (the tlkfac application)")
