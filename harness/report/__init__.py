"""Result formats: ktap (KTAP v1 writer), ktap_parser (the strict reader). The --ktap option is
harness.pytest.ktap."""
