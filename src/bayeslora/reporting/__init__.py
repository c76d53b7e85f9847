"""Reports over runs: tables (:mod:`.tables`), ``bayeslora report`` (:mod:`.report`, :mod:`.html`), plots of learned
structure and costs (:mod:`.plots`), bit operations (:mod:`.bops`) and the rank / bit-width record of an adapter
(:mod:`.structure`)."""

from .bops import bops_report
from .report import run_report
from .tables import COLUMNS, REPORT_COLUMNS, format_table

__all__ = ["COLUMNS", "REPORT_COLUMNS", "bops_report", "format_table", "run_report"]
