"""twolevel_kfac.curvature: what a layer's curvature block is (``docs/architecture.md``).

Importing the package registers the built-in layer types: ``Linear`` and ``Embedding``
(:mod:`.layer_types`; tables keeping their token frequencies as a vector: :mod:`.tokens`,
:mod:`.token_form`), the convolutions
(:mod:`.convolutions`), the norm layers (:mod:`.scale_shift`).
"""

from . import convolutions, scale_shift, tokens  # noqa: F401  (they register their layer types)
