"""Integration tests of RecordService through a real server process and the real stack."""
