"""Self-contained HTML reports of trajectories: every image inline, plain JavaScript filters, no network."""

from medeyes.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
