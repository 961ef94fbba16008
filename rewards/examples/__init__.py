"""Example reward handlers used by the documentation and the tests."""
