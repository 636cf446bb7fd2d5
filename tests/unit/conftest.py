"""tests/unit: pure logic, no fixtures of the test bed.

Nothing in this tier imports kubernetes or dbusmock, directly or through a conftest, so it
runs anywhere in seconds (tests/unit/test_tier.py checks it).
"""
