"""AttentionAE-sc clustering: ``hitanno cluster`` and :func:`cluster`, its library form.

Modules: :mod:`.preprocess` (counts → HVG z-scores or LSI, size factors),
:mod:`.graph` (kNN, Gaussian/UMAP connectivities, Leiden), :mod:`.model` (the network),
:mod:`.losses` (ZINB/Bernoulli, graph decoder, DEC), :mod:`.config` (training options
and history), :mod:`.batching` (a batch's graph rows), :mod:`.trainer` (both phases in
batches of cells), :mod:`.inference` (embedding and assigning cells), :mod:`.io`
(outputs, saved model), :mod:`.pipeline` (the command end to end), :mod:`.simulate`
(count matrices with known clusters).
"""

from hitanno_cli.clustering.pipeline import ClusterOptions, cluster

__all__ = ["ClusterOptions", "cluster"]
