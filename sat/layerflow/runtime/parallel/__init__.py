"""One video on several processes: guidance-parallel and Ulysses sequence-parallel sampling, split VAE decode.

* :mod:`.layout`     which rank does what (groups, guidance pairs, token slices) and the checks of
                     ``runtime.parallel`` that run before any model loads;
* :mod:`.groups`     the torch.distributed process groups of that layout;
* :mod:`.ulysses`    the all-to-all over heads around attention;
* :mod:`.guidance`   the guidance batch split over a pair of ranks;
* :mod:`.vae_decode` the decoder's regions dealt out over the group;
* :mod:`.agreement`  the group's vote before each exchange, so that a failing rank stops its
                     partners at once (and a dead or hung one after ``runtime.parallel.timeout_s``).
"""

from layerflow.runtime.parallel.groups import ParallelGroups, current, groups_for, setup
from layerflow.runtime.parallel.layout import GroupLayout, check_layout

__all__ = ["GroupLayout", "ParallelGroups", "check_layout", "current", "groups_for", "setup"]
