# The cffi extension built from books.c (gateway/books/native_build.py); typed loosely:
# gateway/books/native.py is its only user and converts every value it reads.
from typing import Any

ffi: Any
lib: Any
