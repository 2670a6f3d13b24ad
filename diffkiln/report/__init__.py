"""Reports: metrics, report.json and report.html."""

from diffkiln.report.evaluate import Report, ReportConfig, build_report, report, write_report

__all__ = ["Report", "ReportConfig", "build_report", "report", "write_report"]
