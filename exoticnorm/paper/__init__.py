"""``exoticnorm paper``: paper.md and paper.pdf from the studies' reports, every number traced
to its source (paper/README.md describes the inputs and files)."""

from .command import write_paper
from .pdf import latex_to_typst

__all__ = ["latex_to_typst", "write_paper"]
