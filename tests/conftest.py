"""The root of the test tiers: nothing here, on purpose.

Each tier has its own conftest and loads only what it needs: tests/unit nothing heavy,
tests/dbus the private system bus, tests/kube the control plane and the bus, tests/e2e the
control plane and the nspawn hosts (the shared fixtures are in tests/fixtures/). Whatever
this file imported, every tier would import: tests/unit/test_tier.py checks that
`pytest tests/unit` imports neither kubernetes nor dbusmock.
"""
