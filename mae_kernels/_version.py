"""The one version of the mae-kernels distribution: read by setuptools (pyproject.toml's dynamic
version), `mae_kernels.__version__` and `mae --version`. CHANGELOG.md says what each one changed."""
__version__ = "0.1.0"
