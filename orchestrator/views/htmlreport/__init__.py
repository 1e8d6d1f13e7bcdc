"""`orchestrator report`: one self-contained HTML page per experiment.

- data: what the page shows, read from the results root (`collect`), ranked and checked.
- figures: the plots (matplotlib, imported only here), each a PNG inlined in the page.
- page: the HTML itself and where it is written.
"""

from .data import Figure, FoldInfo, GroupInfo, ReportData, ReportResult, collect, missing, ranked
from .figures import make_figures, worker_spans, worker_usage
from .page import default_output, render_html, write_report

__all__ = ["Figure", "FoldInfo", "GroupInfo", "ReportData", "ReportResult", "collect", "default_output", "make_figures", "missing", "ranked", "render_html", "worker_spans", "worker_usage", "write_report"]
