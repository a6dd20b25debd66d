"""Integration tests of the storage backends against the real SQL databases and SeaweedFS."""
