"""B.0.2 Batch normalization and its family, one file per part:

- `collectives`: the sums across mapped axes (devices, vmapped examples, index groups);
- `checks`: the checks of the arguments every normalization takes;
- `layout`: where a batch's values are (the axes reduced, the shards pooled, K);
- `statistics`: the two-pass batch statistics and the denominator s;
- `batchnorm`: batch normalization, `batch_norm` and `batch_stats`, with the notes' derivation
  (its module docstring) and the hand-derived derivatives;
- `renorm`: batch renormalization (Ioffe, 2017), `batch_renorm`, from the same parts;
- `layer`: the core layer `BatchNorm`, a pure ``init``/``apply`` pair with running statistics.

The public names are imported from here (``jstep.normalization.batch_norm``), as before the split.
"""

from __future__ import annotations

# The public names, and the helpers the module jstep.normalization had before it became this
# package (imported from here by the framework layers and the tests), as the redundant aliases.
from jstep.normalization.batchnorm import _forward as _forward
from jstep.normalization.batchnorm import _normalize as _normalize
from jstep.normalization.batchnorm import _normalize_checked as _normalize_checked
from jstep.normalization.batchnorm import _normalize_staged as _normalize_staged
from jstep.normalization.batchnorm import batch_norm, batch_stats
from jstep.normalization.checks import FeatureAxis as FeatureAxis
from jstep.normalization.checks import _across as _across
from jstep.normalization.checks import _check_axis_index_groups as _check_axis_index_groups
from jstep.normalization.checks import _check_axis_name as _check_axis_name
from jstep.normalization.checks import _check_eps as _check_eps
from jstep.normalization.checks import _check_features as _check_features
from jstep.normalization.checks import _check_mask as _check_mask
from jstep.normalization.checks import _check_x as _check_x
from jstep.normalization.checks import _EmptyBatchError as _EmptyBatchError
from jstep.normalization.checks import _feature_axes as _feature_axes
from jstep.normalization.checks import _is_list_of_int_lists as _is_list_of_int_lists
from jstep.normalization.collectives import Groups as Groups
from jstep.normalization.collectives import _all_reduce as _all_reduce
from jstep.normalization.collectives import _as_lists as _as_lists
from jstep.normalization.collectives import _per_device as _per_device
from jstep.normalization.collectives import _pooled_shards as _pooled_shards
from jstep.normalization.collectives import _psum_within as _psum_within
from jstep.normalization.collectives import _rebinding_vmap_axes as _rebinding_vmap_axes
from jstep.normalization.collectives import _split_axis_name as _split_axis_name
from jstep.normalization.collectives import _sum_over_vmap_axes as _sum_over_vmap_axes
from jstep.normalization.layer import BatchNorm, BatchNormParams, BatchNormState
from jstep.normalization.layout import _Layout as _Layout
from jstep.normalization.layout import _layout as _layout
from jstep.normalization.renorm import batch_renorm
from jstep.normalization.statistics import _Centre as _Centre
from jstep.normalization.statistics import _denominator as _denominator
from jstep.normalization.statistics import _masked as _masked
from jstep.normalization.statistics import _moments as _moments
from jstep.normalization.statistics import _safe_inverse as _safe_inverse
from jstep.normalization.statistics import _shift as _shift
from jstep.normalization.statistics import _total as _total

__all__ = ["BatchNorm", "BatchNormParams", "BatchNormState", "batch_norm", "batch_renorm", "batch_stats"]

# The public names keep the module they had before the split (pickles, reprs and docs name it).
for _public in (batch_norm, batch_renorm, batch_stats, BatchNorm, BatchNormParams, BatchNormState):
    _public.__module__ = __name__
del _public
