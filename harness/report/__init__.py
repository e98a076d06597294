"""Result formats: ktap (KTAP v1 writer), pytest_ktap (the --ktap option)."""
