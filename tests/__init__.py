"""The harness's own tests (a package: their module names, tests.test_x, cannot clash with cases/test_x)."""
