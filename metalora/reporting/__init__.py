"""What a researcher reads: figures, report.md, efficiency tables from training metrics."""
