"""hitanno: cell type annotation of scATAC-seq with a hierarchical transformer."""

__version__ = "0.1.0"
