"""Self-contained HTML reports of trajectories: every image inline, plain JavaScript filters, no network.

:mod:`medeyes.report.html` holds it all: ``render_report`` (records to one HTML page) and ``write_report``.
"""
