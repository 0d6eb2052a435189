"""nbdgw's gateway: the gRPC server and the nbdgw command."""

# The one place of the version: pyproject.toml reads it (setuptools dynamic metadata), and
# `nbdgw --version` prints it without the cost of importlib.metadata.
__version__ = "0.1.0"
