"""The harness: every bench writes a record (record.py); report.py turns records into README tables/plots."""
