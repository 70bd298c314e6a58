"""AttentionAE-sc clustering (SPEC §2): ``hitanno cluster``.

Modules: :mod:`.preprocess` (counts → HVG z-scores or LSI, size factors),
:mod:`.graph` (kNN, Gaussian/UMAP connectivities, Leiden), :mod:`.model` (the network),
:mod:`.losses` (ZINB/Bernoulli, graph decoder, DEC), :mod:`.train` (both phases in
batches of cells, inference), :mod:`.io` (outputs, saved model), :mod:`.pipeline`
(the command end to end), :mod:`.simulate` (count matrices with known clusters).
"""
