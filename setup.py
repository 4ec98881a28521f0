"""Only the native order books' cffi extension lives here; everything else is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["gateway/books/native_build.py:ffibuilder"])
